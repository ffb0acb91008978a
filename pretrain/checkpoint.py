"""Checkpoints that survive crashes.

Layout of one checkpoint, `OUTPUT_DIR/checkpoints/step_00001234/`:
- `model.safetensors`: the model weights, loadable on their own (`safetensors.torch.load_file`); the metadata
  holds the model's registered name and constructor arguments as JSON, so the file alone rebuilds the model.
- `train_state.pt`: optimizer, scheduler, grad scaler, RNG states, step and data position, for resume. Only tensors and
  plain Python values, so it loads with `torch.load(weights_only=True)`.
- `meta.json`: step, epoch, a `complete` flag and the size and sha256 of the two other files, written last.

A checkpoint is written into a hidden temporary directory and renamed into place (`os.replace` is atomic on POSIX),
so a process killed mid-save leaves no directory under a final name; `find_latest` ignores anything else.
A file damaged later (a truncated copy, a bad disk) no longer matches its recorded size or sha256 (the same digest
`sha256sum` prints; ~1.4 GB/s on one CPU core): loading it is a `CheckpointError` naming the file, and
`resume=latest` falls back to the newest checkpoint that verifies.

Every weights file is read by `read_weights` and written by `save_weights` (atomically); a state dict that does not
fit a model is reported by `state_dict_mismatch`. Weights never execute code on the way in: `.safetensors` holds
tensors only, and `.pth`/`.pt`/`.bin`/`.ckpt` files (official MAE, timm or open_clip releases) are read with
`torch.load(weights_only=True)`, which refuses a pickle that would import or call anything beyond tensors and plain
containers.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})$")
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
BEST_DIR, LAST_DIR = "best", "last"  # the weights runs that evaluate keep (pretrain/evaluation.py)
WEIGHTS_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    pass


def checkpoint_name(step: int) -> str:
    return f"step_{step:08d}"


def save_checkpoint(
    root: str | Path,
    step: int,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any],
    meta: dict[str, Any],
    model_metadata: dict[str, str] | None = None,
    keep_last: int = 3,
) -> Path:
    """Atomically write checkpoint `step` under `root` and prune all but the newest `keep_last`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / checkpoint_name(step)
    tmp = root / f".tmp-{checkpoint_name(step)}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _write_safetensors(tmp / MODEL_FILE, model_state, model_metadata)  # (the directory's rename is the atomic step)
    torch.save(train_state, tmp / STATE_FILE)
    files = {name: {"bytes": (tmp / name).stat().st_size, "sha256": sha256_of(tmp / name)} for name in (MODEL_FILE, STATE_FILE)}
    (tmp / META_FILE).write_text(json.dumps({**meta, "step": step, "complete": True, "files": files}, indent=2))
    for name in (MODEL_FILE, STATE_FILE, META_FILE):
        _fsync(tmp / name)
    if final.exists():  # the same step saved again (e.g. a resumed run that ends where it started)
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(root)
    prune_checkpoints(root, keep_last, keep=final)
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Checkpoint directories under `root` with a final name, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_PATTERN.match(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.match(p.name).group(1)))


def prune_checkpoints(root: str | Path, keep_last: int, keep: Path | None = None) -> None:
    """Delete all but the newest `keep_last` complete checkpoints (never `keep`, the one just written: a run resumed
    from an older step may sit below checkpoints of higher steps), and temporary directories of killed writers."""
    complete = [path for path in list_checkpoints(root) if is_complete(path)]
    for old in complete[:-keep_last]:
        if old != keep:
            shutil.rmtree(old, ignore_errors=True)
    for stale in Path(root).glob(".tmp-step_*"):  # left by a killed writer
        if not stale.name.endswith(f"-{os.getpid()}"):
            shutil.rmtree(stale, ignore_errors=True)


def checkpoint_problem(path: str | Path, checksums: bool = True) -> str | None:
    """Why `path` is not a usable checkpoint ("incomplete (...)" or "damaged (...)"), or None. Without `checksums`
    only the cheap checks (meta.json, files present with the sizes recorded at save time); with them, also each
    file's sha256 (reads the files)."""
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except FileNotFoundError:
        return f"incomplete (no {META_FILE}: its save did not finish)"
    except (OSError, ValueError) as err:
        return f"damaged ({META_FILE} is unreadable: {err})"
    if not meta.get("complete"):
        return f"incomplete ({META_FILE} does not mark it complete)"
    recorded = meta.get("files", {})  # absent in checkpoints written before sizes and digests were recorded
    for name in (MODEL_FILE, STATE_FILE):
        file = path / name
        if not file.is_file():
            return f"damaged ({name} is missing)"
        if name not in recorded:
            continue
        size = file.stat().st_size
        if size != recorded[name]["bytes"]:
            return f"damaged ({name} has {size} bytes, {recorded[name]['bytes']} when saved: truncated or overwritten)"
        if checksums and sha256_of(file) != recorded[name]["sha256"]:
            return f"damaged ({name} does not match the sha256 recorded when it was saved)"
    return None


def is_complete(path: str | Path) -> bool:
    """Cheap: a finished save whose files are all there with their recorded sizes (no checksums)."""
    return checkpoint_problem(path, checksums=False) is None


def find_latest(root: str | Path, verify: bool = False) -> Path | None:
    """The newest complete checkpoint under `root`, or None. With `verify`, the newest whose checksums match: each
    damaged one passed over is logged as a warning naming it and the damage."""
    for path in reversed(list_checkpoints(root)):
        problem = checkpoint_problem(path, checksums=verify)
        if problem is None:
            return path
        if verify:
            log.warning("skipping checkpoint %s: it is %s", path, problem)
    return None


def resolve_resume(resume: str, checkpoints_dir: str | Path) -> Path | None:
    """`resume=latest` -> newest checkpoint that verifies (None if there is none yet); `resume=PATH` -> that one,
    verified (a CheckpointError naming it if it is missing, unfinished or damaged)."""
    if resume == "latest":
        return find_latest(checkpoints_dir, verify=True)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume checkpoint not found: {path}")
    problem = checkpoint_problem(path)
    if problem is not None:
        raise CheckpointError(f"resume checkpoint is {problem}: {path}")
    return path


def load_train_state(path: str | Path) -> dict[str, Any]:
    return load_torch_file(Path(path) / STATE_FILE)


# ------------------------------------------------------------------------------------------------ weights files
# One reader, one writer and one mismatch report for every weights file the project reads or writes: checkpoints,
# best/last weights of finetuning and detection runs, exports, official releases.

def resolve_weights_file(path: str | Path) -> Path:
    """A weights file, a checkpoint (or best/, last/) directory, a run's checkpoints/ directory or a run directory
    -> the weights file: a run's best/ weights where it kept some (finetuning, detection), else its newest complete
    checkpoint."""
    path = Path(path)
    if path.is_file():
        return path
    for candidate in (path / MODEL_FILE, path / BEST_DIR / MODEL_FILE):
        if candidate.is_file():
            return candidate
    for root in (path / "checkpoints", path):
        latest = find_latest(root)
        if latest is not None:
            return latest / MODEL_FILE
    raise CheckpointError(f"no model weights found at {path} (expected a weights file "
                          f"({', '.join(WEIGHTS_SUFFIXES)}), a checkpoint directory or a run directory with "
                          f"checkpoints/)")


def read_weights(path: str | Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) of a weights file, checkpoint directory or run directory (`resolve_weights_file`),
    never running code from it. `.safetensors`: its tensors and metadata (ours name the model that wrote them);
    with `verify`, a file inside a checkpoint directory is first checked against the size and sha256 in its
    meta.json. `.pth`/`.pt`/`.bin`/`.ckpt`: `torch.load(weights_only=True)` (`load_torch_file`), the usual wrappers
    taken off ({"model": ...}, {"state_dict": ...}, DDP's "module." prefix); no metadata."""
    path = resolve_weights_file(path)
    if path.suffix == ".safetensors":
        if verify:
            _verify_file(path)
        from safetensors import SafetensorError

        metadata = read_weights_metadata(path)
        try:
            return load_file(str(path)), metadata
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"weights file {path} is damaged or not a safetensors file ({err})") from None
    state: Any = load_torch_file(path)
    if not isinstance(state, dict):
        raise CheckpointError(f"weights file {path} holds a {type(state).__name__}, not a state dict")
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module."):]: value for key, value in state.items()}
    tensors = {key: value for key, value in state.items() if torch.is_tensor(value)}
    if not tensors:
        raise CheckpointError(f"weights file {path} holds no tensors (keys: {sorted(state)[:8]})")
    return tensors, {}


def read_weights_metadata(path: str | Path) -> dict[str, str]:
    """The metadata of a safetensors weights file (anything `resolve_weights_file` takes) without reading its
    tensors: ours name the objective and model that wrote them. Other files: {}."""
    path = resolve_weights_file(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"weights file {path} is damaged or not a safetensors file ({err})") from None


# The normalisation statistics a model was trained with travel in its weights file's metadata (as timm's
# pretrained_cfg and open_clip's preprocess_cfg carry them), so that whoever evaluates it feeds it the same inputs.
NORMALISATION_KEYS = ("data_mean", "data_std")
OPEN_CLIP_EXPORT_CONFIG = "open_clip_config.json"


def normalisation_metadata(mean, std) -> dict[str, str]:
    return {"data_mean": json.dumps([float(v) for v in mean]), "data_std": json.dumps([float(v) for v in std])}


def recorded_normalisation(path: str | Path) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(mean, std) the model at `path` (anything `resolve_weights_file` takes, or an open_clip export folder) was
    trained with, as recorded by this project's checkpoints and exports; None when not recorded or not readable
    (the loader reports a missing or damaged file itself)."""
    path = Path(path)
    try:
        export_config = path / OPEN_CLIP_EXPORT_CONFIG
        if export_config.is_file():
            preprocess = json.loads(export_config.read_text()).get("preprocess_cfg", {})
            mean, std = preprocess.get("mean"), preprocess.get("std")
        else:
            weights = resolve_weights_file(path)
            if weights.suffix != ".safetensors":
                return None
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as f:
                metadata = f.metadata() or {}
            if not all(key in metadata for key in NORMALISATION_KEYS):
                return None
            mean, std = (json.loads(metadata[key]) for key in NORMALISATION_KEYS)
    except Exception:  # missing, damaged or foreign: nothing recorded (the loader says what is wrong)
        return None
    if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == 3):
        return None
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def load_torch_file(path: str | Path) -> Any:
    """What a `.pth`/`.pt`/`.bin`/`.ckpt` file (or train_state.pt) holds, read with `torch.load(weights_only=True)`:
    tensors and plain containers only. A pickle that asks for anything else (a class, a function such as
    os.system) is refused with a CheckpointError, its code never run."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    if path.suffix not in WEIGHTS_SUFFIXES:
        raise CheckpointError(f"weights file {path}: expected one of {', '.join(WEIGHTS_SUFFIXES)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise unsafe_pickle_error(path, err) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise CheckpointError(f"weights file {path} is damaged or not a torch file ({_first_line(err)})") from None


def save_weights(path: str | Path, state_dict: Mapping[str, torch.Tensor], metadata: dict[str, str] | None = None
                 ) -> Path:
    """Write `state_dict` as a safetensors file at `path` atomically: a temporary file renamed into place, so a
    reader never sees half a file. Tensors are saved as contiguous CPU copies (safetensors refuses views of shared
    storage)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    _write_safetensors(tmp, state_dict, metadata)
    os.replace(tmp, path)
    return path


def _write_safetensors(path: Path, state_dict: Mapping[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    save_file(tensors, str(path), metadata=metadata or {})


def unsafe_pickle_error(path: str | Path, err: pickle.UnpicklingError) -> CheckpointError:
    """The error for a file that `torch.load(weights_only=True)` refused, with torch's reason (e.g. "unsupported
    GLOBAL posix.system")."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    detail = next((line for line in lines if "unsupported" in line.lower()), lines[0] if lines else "")
    return CheckpointError(
        f"refusing to load {path}: it is not a plain weights file, unpickling it would import or run code "
        f"({detail}). Only tensors and plain containers are loaded (torch.load(weights_only=True)); "
        f"convert weights you trust to .safetensors"
    )


def state_dict_mismatch(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor],
                        allowed_missing: Iterable[str] = ()) -> str | None:
    """How `given` (a checkpoint's tensors) fails to fit `expected` (a model's state dict): the missing,
    unexpected and wrong-shape keys, with shapes, or None when it fits."""
    allowed = set(allowed_missing)
    mismatched = [f"{key}: checkpoint {tuple(given[key].shape)} vs model {tuple(value.shape)}"  # in the model's order
                  for key, value in expected.items() if key in given and tuple(given[key].shape) != tuple(value.shape)]
    missing = [key for key in expected if key not in given and key not in allowed]
    unexpected = [key for key in given if key not in expected]
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:8])}{', ...' if len(keys) > 8 else ''}"
                for what, keys in (("shape mismatch", mismatched), ("missing", missing), ("unexpected", unexpected))
                if keys]
    return "; ".join(problems) or None


def load_state_dict_checked(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], source: Any) -> None:
    """`model.load_state_dict(state_dict)` (strict), but a checkpoint that does not fit the model is a
    CheckpointError naming `source` and listing every missing, unexpected and wrong-shape key."""
    problem = state_dict_mismatch(model.state_dict(), state_dict)
    if problem is not None:
        raise CheckpointError(f"checkpoint {source} does not fit the model ({type(model).__name__}): {problem}")
    model.load_state_dict(state_dict)


def sha256_of(path: str | Path, chunk: int = 16 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _verify_file(path: Path) -> None:
    """Check one file of a checkpoint directory against its meta.json record (no record: nothing to check)."""
    try:
        recorded = json.loads((path.parent / META_FILE).read_text()).get("files", {}).get(path.name)
    except (OSError, ValueError):
        return
    if not recorded:
        return
    size = path.stat().st_size
    if size != recorded["bytes"]:
        raise CheckpointError(f"{path} has {size} bytes, {recorded['bytes']} when saved (truncated or overwritten)")
    if sha256_of(path) != recorded["sha256"]:
        raise CheckpointError(f"{path} does not match the sha256 recorded when it was saved (corrupted)")


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
