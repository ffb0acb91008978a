"""CLIP at large contrastive batches on few devices: gradient accumulation that keeps the large-batch objective (one
process, two processes, the engine through `python -m pretrain`) and FLIP's patch dropout on the image tower."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from clip_helpers import write_tiny_clip_config
from pretrain.cli import main
from pretrain.config import CLIPPretrainConfig, ConfigError, load_config
from pretrain.engine import micro_step
from pretrain.models.clip import create_clip, tokenizer_for
from pretrain.tasks import CLIPTask

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory) -> Path:
    return write_tiny_clip_config(tmp_path_factory.mktemp("clip_config"), "test-tiny-clip-accumulation")


def pairs(name: str, count: int) -> dict[str, torch.Tensor]:
    return {"image": torch.randn(count, 3, 16, 16), "text": tokenizer_for(name)([f"item {i}" for i in range(count)])}


def accumulate(model, batches: list[dict]) -> dict[str, torch.Tensor]:
    """CLIPTask's step over `batches` through the engine's micro_step (accelerate, one process)."""
    accelerator = Accelerator(gradient_accumulation_steps=len(batches), cpu=True)
    logged = CLIPTask().step_micro_batches(model, batches, partial(micro_step, accelerator, model))
    assert accelerator.sync_gradients  # the step's last micro-batch: the optimizer would step now
    return logged


def gradients(model) -> dict[str, torch.Tensor]:
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def assert_same_gradients(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5, msg=lambda m: f"{name}: {m}")


def test_four_micro_batches_of_16_give_the_loss_and_gradients_of_one_batch_of_64(tiny_config):
    torch.manual_seed(0)
    model, name, _ = create_clip(str(tiny_config))
    batch = pairs(name, 64)
    whole = CLIPTask()(model, batch)
    whole["loss"].backward()
    expected = gradients(model)

    logged = accumulate(model, [{k: v[i:i + 16] for k, v in batch.items()} for i in range(0, 64, 16)])
    assert_same_gradients(gradients(model), expected)  # the temperature's included: not counted 4 times
    for key in ("loss", "logit_scale", "image_to_text_acc", "text_to_image_acc"):  # accuracies among all 64
        assert float(logged[key]) == pytest.approx(float(whole[key].detach()), abs=1e-5), key


def test_with_patch_dropout_the_recompute_drops_the_patches_the_cached_features_dropped(tiny_config):
    """The reference keeps the graph of all 4 micro-batches, drawn one after the other as pass 1 draws them: the
    accumulated step equals it only if pass 2 replays pass 1's draws."""
    torch.manual_seed(0)
    model, name, _ = create_clip(str(tiny_config), patch_dropout=0.5)
    model.train()
    micro_batches = [pairs(name, 16) for _ in range(4)]

    torch.manual_seed(1)
    outputs = [model(b["image"], b["text"]) for b in micro_batches]
    image, text = (torch.cat([o[i] for o in outputs]) for i in (0, 1))
    loss = CLIPTask().loss(image, text, outputs[0][2])
    loss.backward()
    expected = gradients(model)

    torch.manual_seed(1)
    logged = accumulate(model, micro_batches)
    assert float(logged["loss"]) == pytest.approx(float(loss.detach()), abs=1e-5)
    assert_same_gradients(gradients(model), expected)


def test_two_processes_of_two_micro_batches_of_16_equal_one_process_of_64(tmp_path):
    report = tmp_path / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "distributed_clip_accumulation.py"), str(tmp_path), str(report)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(report.read_text())
    assert figures["two_processes"] == pytest.approx(figures["alone"], abs=1e-5)
    assert figures["max_grad_difference"] < 1e-5
    assert figures["synced_at_the_end"]


def clip_run(out: Path, config: Path, shards: Path, *overrides: str) -> list[dict]:
    """Two SGD steps of the tiny CLIP through `python -m pretrain`; returns log.jsonl's records."""
    argv = ["--config", str(REPO / "configs" / "clip_vit_tiny_demo.yaml"), f"output_dir={out}",
            f"model.open_clip_config={config}", f"data.train={shards}", "data.val=null", "data.image_size=16",
            "data.num_workers=0", "data.shuffle_buffer=16", "train.epochs=1", "train.stop_after_steps=2",
            "train.log_every=1", "train.mixed_precision=no", "optim.name=sgd", "optim.lr=0.1", "optim.warmup_epochs=0",
            "logging.wandb=disabled", "logging.progress_bar=false", *overrides]
    assert main(argv) == 0
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)  # the next run in this process builds its own
    GradientState._reset_state()
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_an_accumulating_clip_run_trains_as_one_pass_over_the_same_global_batch(tmp_path, tiny_config,
                                                                                 tiny_pair_shards):
    one_pass = clip_run(tmp_path / "one_pass", tiny_config, tiny_pair_shards, "train.batch_size=32")
    accumulated = clip_run(tmp_path / "accumulated", tiny_config, tiny_pair_shards, "train.batch_size=16",
                           "train.grad_accum_steps=2")
    assert [r["step"] for r in accumulated] == [1, 2]
    for a, b in zip(one_pass, accumulated):  # step 2's loss depends on step 1's update
        for key in ("loss", "logit_scale", "image_to_text_acc", "text_to_image_acc"):
            assert b[key] == pytest.approx(a[key], abs=1e-5), key
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    w_one = load_file(tmp_path / "one_pass" / "checkpoints" / "step_00000002" / "model.safetensors")
    w_acc = load_file(tmp_path / "accumulated" / "checkpoints" / "step_00000002" / "model.safetensors")
    for name in w_one:
        torch.testing.assert_close(w_acc[name], w_one[name], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("config, tokens", [("tiny", ("visual.patch_dropout", 5, 3)),
                                            ("vitpretrain-tiny-32", ("visual.trunk.patch_drop", 65, 33))])
def test_patch_dropout_drops_image_tokens_in_training_only(tiny_config, config, tokens):
    """(module, tokens in evaluation, tokens in training): the class token and 4 (64) patches; half the patches."""
    module_name, in_eval, in_training = tokens
    model, name, _ = create_clip(str(tiny_config) if config == "tiny" else config, patch_dropout=0.5)
    seen = []
    model.get_submodule(module_name).register_forward_hook(lambda module, args, out: seen.append(out.shape[1]))
    size = model.visual.image_size[0]
    images, text = torch.randn(2, 3, size, size), tokenizer_for(name)(["a coat", "a bag"])
    with torch.no_grad():
        model.train()(images, text)
        model.eval()(images, text)
    assert seen == [in_training, in_eval]
    plain, _, _ = create_clip(str(tiny_config) if config == "tiny" else config)
    assert isinstance(plain.get_submodule(module_name), torch.nn.Identity)  # off unless asked for


def test_patch_dropout_is_validated_and_a_swin_tower_refuses_it(tmp_path, tiny_pair_shards, capsys):
    assert load_config(CLIPPretrainConfig).model.patch_dropout == 0.0
    for value in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"'model.patch_dropout' must be in \[0, 1\)"):
            load_config(CLIPPretrainConfig, None, [f"model.patch_dropout={value}"])
    assert load_config(CLIPPretrainConfig, None, ["train.grad_accum_steps=4"]).train.grad_accum_steps == 4
    code = main(["objective=clip", f"output_dir={tmp_path}", "model.open_clip_config=vitpretrain-swin-tiny-32",
                 "model.patch_dropout=0.5", f"data.train={tiny_pair_shards}", "data.val=null", "data.num_workers=0",
                 "train.batch_size=16", "logging.wandb=disabled", "logging.progress_bar=false"])
    assert code == 2
    error = capsys.readouterr().err
    assert "'model.patch_dropout': the image tower of vitpretrain-swin-tiny-32 takes no patch dropout" in error


def test_a_clip_run_with_patch_dropout_and_accumulation_trains_and_logs(tmp_path, tiny_config, tiny_pair_shards):
    records = clip_run(tmp_path / "flip", tiny_config, tiny_pair_shards, "train.batch_size=16",
                       "train.grad_accum_steps=2", "model.patch_dropout=0.5")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] > 0 and 0 < r["logit_scale"] <= 100 and 0 <= r["image_to_text_acc"] <= 1 for r in records)
    saved = load_config(CLIPPretrainConfig, tmp_path / "flip" / "config.yaml")
    assert saved.model.patch_dropout == 0.5 and saved.train.grad_accum_steps == 2
