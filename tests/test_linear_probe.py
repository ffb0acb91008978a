"""Linear probe: encoders from checkpoints (MAE's ViT, UM-MAE's and SimMIM's Swin), feature batches, top-k
evaluation, and the entry point end to end."""
from __future__ import annotations

import json

import pytest
import torch

from finetune.cli import main as finetune_main
from finetune.features import feature_encoder
from finetune.linear_probe import LinearProbeHead, evaluate, feature_batches
from pretrain.checkpoint import CheckpointError, resolve_weights_file
from pretrain.cli import main as pretrain_main
from pretrain.config import EncoderConfig
from pretrain.encoders import build_encoder, pretraining_model_from_checkpoint


class _SingleProcess:
    """The parts of an accelerate.Accelerator that `evaluate` uses, for one process."""
    device = torch.device("cpu")
    num_processes = 1

    @staticmethod
    def reduce(tensor, reduction):
        return tensor


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, micro_model, tiny_shards):
    """A micro MAE pretrained for a few steps through `python -m pretrain`."""
    train_dir, val_dir = tiny_shards
    out = tmp_path_factory.mktemp("mae_run")
    argv = [f"model.name={micro_model}", f"data.train={train_dir}", f"data.val={val_dir}", "data.image_size=16",
            "data.num_workers=0", "train.batch_size=8", "train.epochs=1", "train.mixed_precision=no",
            "logging.wandb=disabled", "logging.progress_bar=false", "num_pictures=0", f"output_dir={out}"]
    assert pretrain_main(argv) == 0
    return out


def probe_argv(out, tiny_shards, *overrides):
    train_dir, val_dir = tiny_shards
    return [f"data.train={train_dir}", f"data.val={val_dir}", "data.image_size=16", "data.num_workers=0",
            "train.batch_size=16", "train.epochs=3", "train.mixed_precision=no", "optim.warmup_epochs=1",
            "logging.wandb=disabled", "logging.progress_bar=false", "feature_batch_size=32", f"output_dir={out}",
            *overrides]


def test_resolve_weights_file_accepts_run_checkpoint_and_file(pretrained_run):
    weights = resolve_weights_file(pretrained_run)
    assert weights.name == "model.safetensors" and weights.parent.parent.name == "checkpoints"
    assert resolve_weights_file(weights.parent) == weights
    assert resolve_weights_file(weights) == weights
    with pytest.raises(CheckpointError, match="no model weights found"):
        resolve_weights_file(pretrained_run / "nowhere")


def probe_encoder(checkpoint, **kwargs) -> EncoderConfig:
    """The linear probe's encoder section (its defaults: the model's own pooling, no drop path)."""
    return EncoderConfig(checkpoint=str(checkpoint), global_pool=None, drop_path=0.0, **kwargs)


def test_encoder_from_checkpoint_carries_the_pretrained_weights(pretrained_run):
    mae, _ = pretraining_model_from_checkpoint(pretrained_run)
    encoder = build_encoder(probe_encoder(pretrained_run)).model  # built at the checkpoint's own size
    for name, value in mae.encoder_state_dict().items():
        assert torch.equal(encoder.state_dict()[name], value), name
    # a larger input resamples the position embeddings instead of failing
    bigger = build_encoder(probe_encoder(pretrained_run), 32).model
    assert bigger.pos_embed.shape[1] == 1 + (32 // 4) ** 2
    assert bigger.forward_features(torch.randn(1, 3, 32, 32)).shape[1] == 1 + 64


def test_class_token_features_and_pixel_baseline(pretrained_run):
    images = torch.randn(3, 3, 16, 16)
    encoder, description = feature_encoder(probe_encoder(pretrained_run), 16)
    assert "MAE checkpoint" in description
    features = encoder(images)
    vit = encoder.model
    assert torch.allclose(features, vit.forward_features(images)[:, 0])  # class token after the final norm
    pixels, description = feature_encoder(EncoderConfig(source="pixels"), 16)
    assert description == "raw pixels" and torch.equal(pixels(images), images.reshape(3, -1))


@pytest.mark.parametrize("model_name", ["ummae_swin_tiny_cpu", "simmim_swin_tiny_cpu"])
def test_swin_checkpoints_give_average_pooled_features(tmp_path, model_name):
    """UM-MAE's and SimMIM's Swin encoders through the same road: a timm SwinTransformer with the encoder's
    weights, features = the final norm's output averaged over the last stage's grid."""
    from pretrain.checkpoint import save_checkpoint
    from pretrain.models import create_model
    from pretrain.train_mae import model_metadata

    torch.manual_seed(0)
    pretrained = create_model(model_name)
    save_checkpoint(tmp_path / "checkpoints", 1, pretrained.state_dict(), {"step": 1}, {},
                    model_metadata=model_metadata(pretrained, model_name, "mae"))
    encoder, description = feature_encoder(probe_encoder(tmp_path), 32)
    assert "MAE checkpoint" in description and type(encoder.model).__name__ == "SwinTransformer"
    loaded = encoder.model.state_dict()
    for name, value in pretrained.encoder_state_dict().items():
        assert torch.equal(loaded[name], value), name
    images = torch.randn(2, 3, 32, 32)
    features = encoder(images)
    assert features.shape == (2, 192)  # the last stage's width, 48 x 2^2
    assert torch.allclose(features, encoder.model.forward_features(images).mean(dim=(1, 2)), atol=1e-6)


def test_probe_head_is_batchnorm_without_affine_then_linear():
    head = LinearProbeHead(8, 3)
    assert not head.norm.affine and head.norm.weight is None
    assert head.linear.weight.std() < 0.05
    assert head(torch.randn(4, 8)).shape == (4, 3)


def test_feature_batches_resume_equals_the_uninterrupted_stream():
    features, labels = torch.arange(10.0)[:, None], torch.arange(10)
    full = feature_batches(features, labels, batch_size=4, seed=3)
    first = [next(full) for _ in range(7)]  # runs across passes (10 samples, 4 per batch)
    resumed = feature_batches(features, labels, batch_size=4, seed=3, start_batch=4)
    for expected in first[4:]:
        assert torch.equal(next(resumed)["label"], expected["label"])
    seen_first_pass = torch.cat([b["label"] for b in first])[:10]
    assert sorted(seen_first_pass.tolist()) == list(range(10))  # every sample once per pass


def test_evaluate_counts_top1_and_top5():
    head = torch.nn.Identity()
    logits = torch.tensor([
        [9.0, 1, 2, 3, 4, 5, 0],   # label 0: top-1
        [0.0, 9, 8, 7, 6, 5, 4],   # label 5: top-5, not top-1
        [0.0, 9, 8, 7, 6, 5, 4],   # label 6: neither
        [1.0, 2, 3, 4, 5, 6, 7],   # label 3: top-5
    ])
    accuracy = evaluate(head, logits, torch.tensor([0, 5, 6, 3]), 7, _SingleProcess(), batch_size=3)
    assert accuracy.result(_SingleProcess()) == {"top1": 25.0, "top5": 75.0, "num_samples": 4}
    confusion = accuracy.confusion_matrix(_SingleProcess())
    assert confusion[5, 1] == 1 and confusion[0, 0] == 1 and int(confusion.sum()) == 4


def test_linear_probe_end_to_end_writes_metrics(pretrained_run, tiny_shards, tmp_path, single_thread):
    out = tmp_path / "probe"
    assert finetune_main(probe_argv(out, tiny_shards, f"encoder.checkpoint={pretrained_run}")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 16 and metrics["num_train"] == 64
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100
    assert metrics["feature_dim"] == 32 and "MAE checkpoint" in metrics["encoder"] and metrics["protocol"] == "mae"
    assert (out / "confusion_matrix.png").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 3 * 64 // 16 and "accuracy" in log[-1]
    assert (out / "config.yaml").is_file()


def test_linear_probe_baselines_run(tiny_shards, micro_model, tmp_path, single_thread):
    pixels = tmp_path / "pixels"
    assert finetune_main(probe_argv(pixels, tiny_shards, "encoder.source=pixels")) == 0
    assert json.loads((pixels / "metrics.json").read_text())["feature_dim"] == 3 * 16 * 16
    random_init = tmp_path / "random"
    assert finetune_main(probe_argv(random_init, tiny_shards, f"encoder.model_name={micro_model}")) == 0
    assert json.loads((random_init / "metrics.json").read_text())["encoder"].startswith("random init")


def test_linear_probe_bad_checkpoint_is_one_clear_error(tiny_shards, tmp_path, capsys):
    status = finetune_main(probe_argv(tmp_path / "x", tiny_shards, f"encoder.checkpoint={tmp_path / 'missing'}"))
    assert status == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: no model weights found") and str(tmp_path / "missing") in err[-1]


def test_linear_probe_end_to_end_on_a_swin_checkpoint(tiny_shards, tmp_path, single_thread):
    """A UM-MAE Swin pretrained through `python -m pretrain`, then probed through `python -m finetune`."""
    train_dir, val_dir = tiny_shards
    run = tmp_path / "ummae"
    assert pretrain_main(["model.name=ummae_swin_tiny_cpu", f"data.train={train_dir}", f"data.val={val_dir}",
                          "data.num_workers=0", "train.batch_size=16", "train.epochs=1", "train.mixed_precision=no",
                          "logging.wandb=disabled", "logging.progress_bar=false", "num_pictures=0",
                          f"output_dir={run}"]) == 0
    out = tmp_path / "probe"
    assert finetune_main(probe_argv(out, tiny_shards, f"encoder.checkpoint={run}", "data.image_size=32")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["feature_dim"] == 192 and metrics["num_samples"] == 16 and "MAE checkpoint" in metrics["encoder"]
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100


def test_linear_probe_of_weights_from_elsewhere_names_the_formats_and_the_way_out(tiny_shards, tmp_path, capsys):
    torch.save({"model": {"weight": torch.zeros(2)}}, tmp_path / "someone_elses.pth")
    status = finetune_main(probe_argv(tmp_path / "x", tiny_shards, f"encoder.checkpoint={tmp_path / 'someone_elses.pth'}"))
    assert status == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith(f"error: {tmp_path / 'someone_elses.pth'} is not a checkpoint of this project")
    assert "encoder.source=timm" in line and "UM-MAE or SimMIM Swin" in line
