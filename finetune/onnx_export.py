"""Export an encoder of this project to ONNX, and check the file against torch.

`export_onnx` writes one self-contained .onnx file (weights inside) with a dynamic batch dimension, so the encoders
(a timm trunk, CLIP's image or text tower) can serve from onnxruntime or any other ONNX runtime without this
project, torch or timm. `check_onnx` runs the file with onnxruntime on CPU next to the torch module and returns the
largest difference, so an export that silently changed the numbers fails loudly.

onnx, onnxscript and onnxruntime are an optional extra (`pip install -e '.[onnx]'`): they are imported inside the
functions, and their absence is a one-line error.
"""
from __future__ import annotations

import importlib
import re
import warnings
from pathlib import Path

import torch
from torch import nn

OPSET = 18  # torchlib's own (a newer one runs onnx's version converter); >= 16 has DAT's GridSample
MISSING_EXTRA = "ONNX export needs the onnx extra: pip install -e '.[onnx]'"


class ImageEncoder(nn.Module):
    """A timm model built with num_classes=0: images [N, 3, H, W] -> pooled features [N, D]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)


class CLIPImageTower(nn.Module):
    """An open_clip CLIP model's image side: images -> embeddings (not normalised, as `encode_image` gives them)."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_image(images, normalize=False)


class CLIPTextTower(nn.Module):
    """An open_clip CLIP model's text side: token ids int64 [N, L] -> embeddings (not normalised)."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.clip = clip

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.clip.encode_text(tokens, normalize=False)


def _require_extra() -> None:
    try:
        for name in ("onnx", "onnxscript", "onnxruntime"):  # onnxscript: the dynamo exporter's ONNX op library
            importlib.import_module(name)
    except ImportError:
        raise RuntimeError(MISSING_EXTRA) from None


def _first_line(err: BaseException) -> str:
    """The first line of the innermost cause: the exporter wraps it in a generic "Failed to ... step n/3" page."""
    while err.__cause__ is not None:
        err = err.__cause__
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err)).strip()  # (its colour codes)
    return text.splitlines()[0] if text else type(err).__name__


def _capture(module: nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """The module's graph, batch dimension symbolic. torch.onnx.export would capture it too, but when the batch gets
    pinned it silently retries with the suggested fix (batch = the example's), giving a file for one batch size."""
    dynamic = ({0: torch.export.Dim("batch")},)
    try:
        return torch.export.export(module, (example,), dynamic_shapes=dynamic, strict=False)
    except Exception as non_strict:
        # Non-strict tracing runs the Python code, where e.g. `len(tensor)` must return an int and so pins the
        # batch; dynamo's bytecode tracing (strict) keeps it symbolic, at a few times the cost.
        try:
            return torch.export.export(module, (example,), dynamic_shapes=dynamic, strict=True)
        except Exception:
            raise non_strict from None


def export_onnx(module: nn.Module, example: torch.Tensor, path: str | Path, input_name: str = "images",
                output_name: str = "features") -> Path:
    """module.eval(), exported with the batch dimension dynamic (named "batch"); returns the path. A model that cannot
    be exported -> RuntimeError with one line naming the model class and the first line of the exporter's error."""
    _require_extra()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracing chatter (timm's asserts, the exporter's notes)
            program = _capture(module, example)
            # The dynamo exporter (torch's default; the TorchScript one is deprecated and bakes MSwin's `len(tensor)`
            # in as a constant). The string names the ONNX batch axis; the weights go inside the one file.
            torch.onnx.export(program, (example,), str(path), input_names=[input_name], output_names=[output_name],
                              dynamic_shapes=({0: "batch"},), opset_version=OPSET, dynamo=True, external_data=False,
                              verbose=False)
    except Exception as err:
        raise RuntimeError(f"cannot export {type(module).__name__} to ONNX: {_first_line(err)}") from None
    return path


def check_onnx(path: str | Path, module: nn.Module, inputs: torch.Tensor, atol: float = 1e-4) -> float:
    """Run the file with onnxruntime (CPUExecutionProvider) and the module in torch (eval, no grad) on `inputs`;
    return the max abs difference; raise ValueError naming the file and the difference if it exceeds atol."""
    _require_extra()
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: not its notes on nodes its graph optimiser leaves alone
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {session.get_inputs()[0].name: inputs.detach().cpu().numpy()}
    got = torch.from_numpy(session.run(None, feed)[0])
    module.eval()
    with torch.no_grad():
        want = module(inputs).float().cpu()
    if got.shape != want.shape:
        raise ValueError(f"{path}: onnxruntime gives shape {tuple(got.shape)}, torch {tuple(want.shape)}")
    diff = (got.float() - want).abs().max().item()
    if not diff <= atol:  # (NaN fails too)
        raise ValueError(f"{path}: onnxruntime differs from torch by {diff:.3g} (> atol {atol:g})")
    return diff
