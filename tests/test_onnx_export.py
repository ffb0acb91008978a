"""ONNX export of the encoders (finetune/onnx_export.py): every model is exported with a batch of 2 and run by
onnxruntime on a batch of 3 (so the batch axis is dynamic), next to torch; and the one-line errors."""

from __future__ import annotations

import sys

import pytest

pytest.importorskip("onnxruntime")  # the optional onnx extra
pytest.importorskip("onnxscript")

import onnx  # noqa: E402
import onnxruntime  # noqa: E402
import timm  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

import pretrain.models  # noqa: E402  (registers the survey backbones with timm)
from finetune.onnx_export import (  # noqa: E402
    MISSING_EXTRA, CLIPImageTower, CLIPTextTower, ImageEncoder, check_onnx, export_onnx)
from pretrain.encoders import encoder_of  # noqa: E402
from pretrain.models.clip import create_clip, tokenizer_for  # noqa: E402

pytestmark = pytest.mark.usefixtures("single_thread")

SIZE = 32  # every model here takes 32x32 images (the CPU configs of pretrain.models and the backbones)
PROMPTS = ["a photo of a bag", "a sandal", "a photo of a shirt"]


def images(n: int, size: int = SIZE) -> torch.Tensor:
    return torch.randn(n, 3, size, size)


def named_shapes(values) -> list:
    """[(name, [dims])] of a graph's inputs or outputs, a dynamic dim by its name."""
    return [(v.name, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]


def encoder(model: nn.Module):
    """(module, batch of 2 to export with, batch of 3 to check with, feature width)."""
    return ImageEncoder(model), images(2), images(3), model.num_features


def clip_tower(side: str):
    clip, name, cfg = create_clip("vitpretrain-tiny-32")
    if side == "image":
        size = cfg["vision_cfg"]["image_size"]
        return CLIPImageTower(clip), images(2, size), images(3, size), cfg["embed_dim"]
    tokens = tokenizer_for(name)(PROMPTS)  # int64 [3, context length]
    return CLIPTextTower(clip), tokens[:2], tokens, cfg["embed_dim"]


MODELS = {
    # (our MAE's ViT: through the CLI in test_export.py)
    "simmim_swin": lambda: encoder(encoder_of(pretrain.models.create_model("simmim_swin_tiny_cpu"), SIZE)),
    **{name: (lambda name=name: encoder(timm.create_model(name, num_classes=0)))
       for name in ("crossformer_cpu", "dat_cpu", "aa_resnet_cpu")},
    # one block a stage (MSwin's blocks are all alike: no shifted windows) halves the slowest of these exports
    "mswin_cpu": lambda: encoder(timm.create_model("mswin_cpu", num_classes=0, depths=(1, 1, 1))),
    "clip_image": lambda: clip_tower("image"),
    "clip_text": lambda: clip_tower("text"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_export_matches_torch_at_another_batch_size(name, tmp_path):
    torch.manual_seed(0)
    module, example, inputs, width = MODELS[name]()
    text = name == "clip_text"
    path = export_onnx(module, example, tmp_path / f"{name}.onnx", input_name="tokens" if text else "images")
    assert path == tmp_path / f"{name}.onnx" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]  # one file

    graph = onnx.load(str(path)).graph
    assert named_shapes(graph.input) == [("tokens" if text else "images", ["batch", *example.shape[1:]])]
    assert named_shapes(graph.output) == [("features", ["batch", width])]

    diff = check_onnx(path, module, inputs)
    assert diff <= 1e-4
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.run(None, {graph.input[0].name: inputs.numpy()})[0].shape == (3, width)


class DataDependent(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # a branch on the values: no one graph for it
        return images * 2 if images.sum() > 0 else images


class SingularValues(nn.Module):
    def forward(self, images: torch.Tensor) -> torch.Tensor:  # an op ONNX has no function for
        return torch.linalg.svdvals(images)


def test_errors_are_one_line(tmp_path, monkeypatch):
    torch.manual_seed(0)
    for module, cause in ((DataDependent(), "data-dependent"), (SingularValues(), "No ONNX function found")):
        with pytest.raises(RuntimeError) as err:
            export_onnx(module, images(2), tmp_path / "bad.onnx")
        message = str(err.value)
        assert message.startswith(f"cannot export {type(module).__name__} to ONNX: ") and cause in message
        assert "\n" not in message and "\x1b" not in message

    linear, other = (nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, 4)) for _ in range(2))
    path = export_onnx(linear, images(2), tmp_path / "linear.onnx")
    assert check_onnx(path, linear, images(3)) <= 1e-4
    with pytest.raises(ValueError, match=r"linear\.onnx: onnxruntime differs from torch by .* \(> atol 0\.0001\)"):
        check_onnx(path, other, images(3))  # other weights

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the onnx extra were not installed
    with pytest.raises(RuntimeError) as err:
        export_onnx(linear, images(2), tmp_path / "x.onnx")
    assert str(err.value) == MISSING_EXTRA
    with pytest.raises(RuntimeError) as err:
        check_onnx(path, linear, images(3))
    assert str(err.value) == MISSING_EXTRA
