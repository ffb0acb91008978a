"""Checkpoints that survive crashes.

Layout of one checkpoint, `OUTPUT_DIR/checkpoints/step_00001234/`:
- `model.safetensors`: the model weights, loadable on their own (`safetensors.torch.load_file`); the metadata
  holds the model's registered name and constructor arguments as JSON, so the file alone rebuilds the model.
- `train_state.pt`: optimizer, scheduler, grad scaler, RNG states, step and data position, for resume. Only tensors and
  plain Python values, so it loads with `torch.load(weights_only=True)`.
- `meta.json`: step, epoch and a `complete` flag, written last.

A checkpoint is written into a hidden temporary directory and renamed into place (`os.replace` is atomic on POSIX),
so a process killed mid-save leaves no directory under a final name; `find_latest` ignores anything else.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})$")
MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"


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
    # safetensors refuses views of shared storage: save contiguous copies
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items()}
    save_file(tensors, str(tmp / MODEL_FILE), metadata=model_metadata or {})
    torch.save(train_state, tmp / STATE_FILE)
    (tmp / META_FILE).write_text(json.dumps({**meta, "step": step, "complete": True}, indent=2))
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


def is_complete(path: str | Path) -> bool:
    path = Path(path)
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        return False
    return bool(meta.get("complete")) and (path / MODEL_FILE).is_file() and (path / STATE_FILE).is_file()


def find_latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    for path in reversed(list_checkpoints(root)):
        if is_complete(path):
            return path
    return None


def resolve_resume(resume: str, checkpoints_dir: str | Path) -> Path | None:
    """`resume=latest` -> newest complete checkpoint (None if there is none yet); `resume=PATH` -> that one."""
    if resume == "latest":
        return find_latest(checkpoints_dir)
    path = Path(resume)
    if not path.is_dir():
        raise CheckpointError(f"resume checkpoint not found: {path}")
    if not is_complete(path):
        raise CheckpointError(f"resume checkpoint is incomplete (no {META_FILE} marking it complete): {path}")
    return path


def load_train_state(path: str | Path) -> dict[str, Any]:
    return torch.load(Path(path) / STATE_FILE, map_location="cpu", weights_only=True)


def load_model_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(state dict, metadata) from a checkpoint directory or a `.safetensors` file."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"model weights not found: {path}")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    return load_file(str(path)), metadata


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
