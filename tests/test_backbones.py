"""The survey's backbones (pretrain/models/backbones) under every objective and head, as ViT and Swin are:
SimMIM pretraining through `python -m pretrain`, then the one encoder road (pretrain/encoders.py) into a linear
probe, k-NN, finetuning with layer decay, DeiT distillation (student and teacher) and DETR, through
`python -m finetune`. Each backbone's own semantics are tested in tests/test_backbone_<name>.py."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import timm
import torch

from finetune.cli import main as finetune_main
from pretrain.cli import main as pretrain_main
from pretrain.config import EncoderConfig, OptimConfig
from pretrain.encoders import build_encoder, pretraining_model_from_checkpoint
from pretrain.engine import build_optimizer
from pretrain.models import create_model

REPO = Path(__file__).resolve().parents[1]
BACKBONES = ["crossformer", "dat", "mswin", "aa_resnet"]
PAPER_SIZES = ["crossformer_tiny", "crossformer_small", "crossformer_base", "crossformer_large", "dat_tiny",
               "dat_small", "dat_base", "mswin_tiny", "aa_resnet26", "aa_resnet50"]

pytestmark = pytest.mark.usefixtures("single_thread")


def test_every_size_is_a_timm_model_after_importing_our_models():
    for name in PAPER_SIZES + [f"{backbone}_cpu" for backbone in BACKBONES]:
        assert timm.is_model(name), name


@pytest.mark.parametrize("backbone", BACKBONES)
def test_simmim_masked_pixels_cannot_change_any_output(backbone):
    """Masked pixels are zeroed before the patch embedding: whatever they hold, the encoder's output and the
    prediction are the same. Without the zeroing, an overlapping embedding (CrossFormer's 32-px kernel, the ResNet
    stem) would let them into the visible tokens next to them."""
    torch.manual_seed(0)
    model = create_model(f"simmim_{backbone}_cpu").eval()
    images = torch.randn(2, 3, 32, 32)
    mask = model.random_masking(2, 0.6, images.device, noise=torch.rand(2, model.num_patches))
    pixel_mask = model.upsample_mask(mask, model.mask_patch_size).permute(0, 3, 1, 2)
    altered = images + 3 * torch.randn_like(images) * pixel_mask
    with torch.no_grad():
        latent, altered_latent = model.forward_encoder(images, mask), model.forward_encoder(altered, mask)
        assert torch.equal(latent, altered_latent)
        visible = model.upsample_mask(1 - mask, model.tokens_per_mask_patch)[..., 0].bool()  # [N, h, w]
        leaked = (model.encoder.forward_embed(images) - model.encoder.forward_embed(altered)).abs().amax(-1)
    if backbone in ("crossformer", "aa_resnet"):  # overlapping embeddings: the zeroing is what keeps them blind
        assert leaked[visible].max() > 1e-3


@pytest.mark.parametrize("backbone", BACKBONES)
def test_simmim_loss_backward_reaches_the_backbone_and_the_mask_token(backbone):
    torch.manual_seed(0)
    model = create_model(f"simmim_{backbone}_cpu")
    loss, pred, mask = model(torch.randn(2, 3, 32, 32))
    assert pred.shape == (2, 16, 8 * 8 * 3) and mask.sum() == 2 * math.ceil(16 * 0.6)
    loss.backward()
    assert model.mask_token.grad.abs().sum() > 0
    assert model.encoder_state_dict().keys() == timm.create_model(f"{backbone}_cpu", num_classes=0).state_dict().keys()
    assert "mask_token" in model.no_weight_decay()


def simmim_run(root, backbone: str, tiny_shards):
    """SimMIM over the backbone's cpu size for 3 steps through `python -m pretrain`, reconstructions drawn."""
    train_dir, val_dir = tiny_shards
    out = root / f"simmim_{backbone}"
    argv = ["--config", str(REPO / "configs" / "simmim_backbone_cpu_demo.yaml"), f"model.name=simmim_{backbone}_cpu",
            f"data.train={train_dir}", f"data.val={val_dir}", "data.num_workers=0", "data.shuffle_buffer=16",
            "train.batch_size=8", "train.epochs=1", "train.stop_after_steps=3", "train.mixed_precision=no",
            "logging.wandb=disabled", "logging.progress_bar=false", "num_pictures=2", f"output_dir={out}"]
    assert pretrain_main(argv) == 0
    return out


@pytest.fixture(scope="module")
def simmim_runs(tmp_path_factory, tiny_shards):
    from accelerate.state import AcceleratorState, GradientState

    root = tmp_path_factory.mktemp("simmim_backbones")
    runs = {}
    for backbone in BACKBONES:
        runs[backbone] = simmim_run(root, backbone, tiny_shards)
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    return runs


@pytest.mark.parametrize("backbone", BACKBONES)
def test_simmim_run_writes_weights_that_the_encoder_road_loads(simmim_runs, backbone):
    out = simmim_runs[backbone]
    assert (out / "reconstructions.png").is_file()
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 3 and all(math.isfinite(r["loss"]) for r in records)
    model, spec, description = build_encoder(EncoderConfig(checkpoint=str(out)), 32, num_classes=10)
    assert (spec["builder"], spec["model_name"]) == ("timm", f"{backbone}_cpu") and "MAE checkpoint" in description
    pretrained, _ = pretraining_model_from_checkpoint(out)
    loaded = model.state_dict()
    for name, value in pretrained.encoder_state_dict().items():
        assert torch.equal(loaded[name], value), name
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_layer_decay_gives_every_block_its_own_lr_scale(simmim_runs, backbone):
    model = build_encoder(EncoderConfig(checkpoint=str(simmim_runs[backbone])), 32, num_classes=10).model
    optimizer = build_optimizer(model, OptimConfig(name="adamw"), lr=1e-3, layer_decay=0.75)
    scales = sorted({group["lr_scale"] for group in optimizer.param_groups})
    assert len(scales) >= 4 and scales[-1] == 1.0  # the head at the full lr, the embedding at the smallest
    grouped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert grouped == {id(p) for p in model.parameters() if p.requires_grad}


def finetune_argv(out, tiny_shards, *overrides):
    train_dir, val_dir = tiny_shards
    return ["--config", str(REPO / "configs" / "finetune_mae_tiny_fmnist.yaml"), f"data.train={train_dir}", f"data.val={val_dir}",
            "data.image_size=32", "data.num_workers=0", "data.shuffle_buffer=16", "train.batch_size=16",
            "train.epochs=1", "train.mixed_precision=no", "train.log_every=2", "optim.warmup_epochs=0.5",
            "logging.wandb=disabled", "logging.progress_bar=false", "eval_batch_size=8", f"output_dir={out}",
            *overrides]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory, simmim_runs, tiny_shards):
    """CrossFormer and the AA-ResNet finetuned from their SimMIM runs (layer decay 0.75): the teachers below."""
    from accelerate.state import AcceleratorState, GradientState

    runs = {}
    for backbone in ("crossformer", "aa_resnet"):
        out = tmp_path_factory.mktemp("finetune") / backbone
        assert finetune_main(finetune_argv(out, tiny_shards, f"encoder.checkpoint={simmim_runs[backbone]}")) == 0
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        runs[backbone] = out
    return runs


@pytest.mark.parametrize("backbone", ["crossformer", "aa_resnet"])
def test_finetune_from_simmim(finetuned, backbone):
    metrics = json.loads((finetuned[backbone] / "metrics.json").read_text())
    assert 0 <= metrics["top1"] <= 100 and "MAE checkpoint" in metrics["model"]
    model, spec, _ = build_encoder(EncoderConfig(checkpoint=str(finetuned[backbone])), keep_head=True)
    assert spec["model_name"] == f"{backbone}_cpu" and model(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("student, teacher", [("dat", "crossformer"), ("mswin", "aa_resnet")])
def test_distillation_between_backbones(finetuned, simmim_runs, tiny_shards, tmp_path, student, teacher):
    """The student keeps its class head for both terms (no distillation token outside ViTs)."""
    out = tmp_path / "student"
    argv = finetune_argv(out, tiny_shards, f"encoder.checkpoint={simmim_runs[student]}",
                         f"distillation.teacher={finetuned[teacher]}", "distillation.kind=hard")
    assert finetune_main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["distillation"] == "hard" and str(finetuned[teacher]) in metrics["teacher"]
    assert 0 <= metrics["top1"] <= 100


@pytest.mark.parametrize("backbone, task", [("dat", "knn"), ("mswin", "knn"), ("aa_resnet", "linear_probe"),
                                            ("crossformer", "linear_probe")])
def test_frozen_feature_heads(simmim_runs, tiny_shards, tmp_path, backbone, task):
    train_dir, val_dir = tiny_shards
    out = tmp_path / task
    argv = [f"task={task}", f"encoder.checkpoint={simmim_runs[backbone]}", f"data.train={train_dir}",
            f"data.val={val_dir}", "data.image_size=32", "data.num_workers=0", "train.batch_size=16",
            "train.mixed_precision=no", "logging.wandb=disabled", "logging.progress_bar=false", f"output_dir={out}"]
    argv += ["k=[5]"] if task == "knn" else ["train.epochs=2", "optim.warmup_epochs=1", "feature_batch_size=32"]
    assert finetune_main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_test" if task == "knn" else "num_samples"] == 16 and (out / "confusion_matrix.png").is_file()


@pytest.mark.parametrize("backbone", BACKBONES)
def test_detr_backbone_takes_batches_of_other_sizes_with_padding_masks(simmim_runs, backbone):
    from finetune.detection import build_backbone

    torch.manual_seed(0)
    cfg = EncoderConfig(checkpoint=str(simmim_runs[backbone]), image_size=32, global_pool=None, drop_path=0.0)
    backbone_model, _, _ = build_backbone(cfg)
    images, mask = torch.randn(2, 3, 45, 61), torch.zeros(2, 45, 61, dtype=torch.bool)
    mask[1, :, 30:] = True
    features, small_mask = backbone_model(images, mask)
    assert features.shape[:2] == (2, backbone_model.num_channels) and small_mask.shape == (2, *features.shape[-2:])
    assert small_mask[1, :, -1].all() and not small_mask[1, :, 0].any()  # image 1's padded right half


def test_size_and_speed_benchmark_rows():
    """benchmarks/backbones.py: CrossFormer-T's parameters and FLOPs against the paper's, and a speed row against
    timm's Swin-T (one step of one image each: the figures exist and are positive; no timing is judged)."""
    from benchmark_helpers import load_benchmark

    bench = load_benchmark("backbones")
    row = bench.size_row("crossformer_tiny")
    assert abs(row["params_m"] - row["paper_params_m"]) < 0.1 and abs(row["gmacs"] - row["paper_gmacs"]) < 0.1
    speed = bench.speed_row("crossformer_tiny", batch_size=1, repeats=1, img_size=64)
    assert speed["reference"] == "swin_tiny_patch4_window7_224" and speed["images_per_s"] > 0
    assert speed["ratio"] == pytest.approx(speed["images_per_s"] / speed["reference_images_per_s"])
