"""The training engine through its real entry point (`pretrain.cli.main` / `python -m pretrain`) on a micro MAE:
outputs, lr scaling and schedule, gradient accumulation, exact resume, atomic checkpoints, non-finite losses."""

from __future__ import annotations

import json
import math
import re
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from data import count_samples, expand_shards
from pretrain.checkpoint import (
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    find_latest,
    is_complete,
    list_checkpoints,
    read_weights,
    load_train_state,
    resolve_resume,
    save_checkpoint,
)
from pretrain.cli import main
from pretrain.config import ConfigError, MAEPretrainConfig, OptimConfig, TrainConfig, load_config
from pretrain.engine import NonFiniteLossError, Schedule
from pretrain.models import MaskedAutoencoderViT
from pretrain.tasks import MAETask
from pretrain.train_mae import run_mae

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "mae_vit_tiny_demo.yaml"

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------ helpers


def train(argv: list[str]) -> None:
    assert main(argv) == 0


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / MODEL_FILE)


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [name for name in a if not torch.equal(a[name], b[name])]
    assert not different, f"tensors differ: {different}"


def expected_lr(update: int, peak: float, min_lr: float, warmup: int, total: int) -> float:
    """The documented schedule, written independently of timm: linear warmup from 0 over `warmup` updates, then a
    half cosine from `peak` to `min_lr` over the remaining updates. `update` counts from 0."""
    if update < warmup:
        return peak * update / warmup
    progress = (update - warmup) / (total - warmup)
    return min_lr + 0.5 * (peak - min_lr) * (1 + math.cos(math.pi * progress))


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


# ------------------------------------------------------------------------------------------------ outputs


def test_tiny_run_writes_log_checkpoint_weights_and_pictures(tmp_path, tiny_args):
    out = tmp_path / "run"
    train(tiny_args(out, "train.log_every=2", "train.save_every=4", "optim.base_lr=1e-3"))

    records = read_log(out)
    assert [r["step"] for r in records] == [2, 4, 6, 8]  # 64 images / batch 8 = 8 steps, logged every 2
    for record in records:
        assert {"step", "loss", "lr", "images_per_s", "epoch"} <= record.keys()
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert record["lr"] > 0 and record["images_per_s"] > 0
        assert record["skipped_samples"] == 0
    assert records[-1]["epoch"] == 1.0

    checkpoints = out / "checkpoints"
    assert [p.name for p in list_checkpoints(checkpoints)] == ["step_00000004", "step_00000008"]
    latest = find_latest(checkpoints)
    assert latest == checkpoints / "step_00000008"
    meta = json.loads((latest / META_FILE).read_text())
    assert meta["complete"] is True and meta["step"] == 8 and meta["epoch"] == 1.0

    # The weights file alone: plain safetensors, and its metadata rebuilds the model.
    state_dict = load_file(latest / MODEL_FILE)
    with safe_open(str(latest / MODEL_FILE), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["objective"] == "mae" and metadata["model_name"] == "mae_test_micro"
    data = load_config(MAEPretrainConfig, out / "config.yaml").data  # the inputs' statistics travel with the weights
    assert (json.loads(metadata["data_mean"]), json.loads(metadata["data_std"])) == (list(data.mean), list(data.std))
    model = MaskedAutoencoderViT(**json.loads(metadata["model_config"]))
    model.load_state_dict(state_dict)  # strict: every tensor has its place and shape
    assert model.patch_embed.img_size == (16, 16) and len(model.blocks) == 1
    loss, pred, _ = model(torch.randn(2, 3, 16, 16), noise=torch.rand(2, model.num_patches))
    assert torch.isfinite(loss) and pred.shape == (2, 16, 4 * 4 * 3)
    # Trained: the run started from the model built after seeding with train.seed (0); learned weights moved,
    # the fixed sin-cos position embeddings did not.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        initial = MaskedAutoencoderViT(**model.config).state_dict()
    for name in ("patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "decoder_pred.weight", "mask_token"):
        assert not torch.equal(state_dict[name], initial[name]), name
    for name in ("pos_embed", "decoder_pos_embed"):
        assert torch.equal(state_dict[name], initial[name]), name

    # The train state loads without unpickling arbitrary objects.
    state = torch.load(latest / STATE_FILE, weights_only=True)
    assert state["step"] == 8 and state["global_batch"] == 8
    assert state["data"] == {"batches_consumed_per_process": 8, "samples_seen": 64}

    for picture in ("reconstructions.png", "loss_curve.png"):
        with Image.open(out / picture) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
    assert load_config(MAEPretrainConfig, out / "config.yaml").output_dir == str(out)


# ------------------------------------------------------------------------------------------------ lr and batch


@pytest.mark.parametrize("batch_size, accum_steps", [(8, 1), (4, 2), (16, 1)])
def test_lr_scales_with_global_batch_and_accumulation_multiplies_the_batch(
    tmp_path, tiny_args, tiny_shards, batch_size, accum_steps
):
    out = tmp_path / "run"
    train_images = count_samples(expand_shards(str(tiny_shards[0])))
    base_lr = 1e-3
    global_batch = batch_size * accum_steps
    train(tiny_args(
        out, f"train.batch_size={batch_size}", f"train.grad_accum_steps={accum_steps}", f"optim.base_lr={base_lr}",
        "optim.warmup_epochs=0", "train.log_every=1",
    ))
    records = read_log(out)
    steps_per_epoch = train_images // global_batch
    assert [r["step"] for r in records] == list(range(1, steps_per_epoch + 1))  # one epoch
    assert records[-1]["epoch"] == 1.0
    # Without warmup the first update runs at the peak: base_lr x global batch / 256.
    assert records[0]["lr"] == pytest.approx(base_lr * global_batch / 256, rel=1e-12)
    state = load_train_state(find_latest(out / "checkpoints"))
    assert state["global_batch"] == global_batch
    assert state["data"]["batches_consumed_per_process"] == steps_per_epoch * accum_steps
    assert state["data"]["samples_seen"] == train_images == 64


def test_absolute_lr_overrides_the_scaling_rule(tmp_path, tiny_args):
    out = tmp_path / "run"
    train(tiny_args(out, "optim.lr=3e-3", "optim.base_lr=1", "optim.warmup_epochs=0", "train.stop_after_steps=1"))
    assert read_log(out)[0]["lr"] == pytest.approx(3e-3, rel=1e-12)


def test_schedule_derives_global_batch_and_steps_from_batch_processes_and_accumulation():
    schedule = Schedule.derive(1000, TrainConfig(batch_size=16, grad_accum_steps=4, epochs=3),
                               OptimConfig(base_lr=1e-3, warmup_epochs=0.5), world_size=2)
    assert schedule.global_batch == 16 * 2 * 4
    assert schedule.steps_per_epoch == 1000 // 128 == 7
    assert schedule.total_steps == 21 and schedule.warmup_steps == round(3.5)
    assert schedule.lr == pytest.approx(1e-3 * 128 / 256)
    with pytest.raises(ConfigError, match=r"fewer than one global batch of 128 .*train\.batch_size"):
        Schedule.derive(100, TrainConfig(batch_size=16, grad_accum_steps=4), OptimConfig(), world_size=2)


def test_gradient_accumulation_matches_the_same_global_batch_in_one_pass(tmp_path, tiny_args):
    """batch 4 x 2 accumulation steps sees the same samples and masks as batch 8 in one pass, and makes one update
    per step: losses and weights agree up to float rounding (the loss of step 2 depends on the update of step 1).
    SGD, whose update is linear in the gradient, keeps rounding differences as small as they are (Adam's first
    update is about lr x sign(gradient), which turns rounding noise in near-zero gradients into +-lr)."""
    common = ("optim.name=sgd", "optim.lr=0.1", "optim.warmup_epochs=0", "train.log_every=1", "train.stop_after_steps=3")
    train(tiny_args(tmp_path / "one_pass", "train.batch_size=8", *common))
    train(tiny_args(tmp_path / "accumulated", "train.batch_size=4", "train.grad_accum_steps=2", *common))
    one_pass, accumulated = read_log(tmp_path / "one_pass"), read_log(tmp_path / "accumulated")
    assert [r["step"] for r in accumulated] == [1, 2, 3]
    for a, b in zip(one_pass, accumulated):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["lr"] == a["lr"]
    w_one = weights(tmp_path / "one_pass" / "checkpoints" / "step_00000003")
    w_acc = weights(tmp_path / "accumulated" / "checkpoints" / "step_00000003")
    for name in w_one:
        torch.testing.assert_close(w_acc[name], w_one[name], rtol=1e-4, atol=1e-6)


def test_lr_follows_linear_warmup_then_cosine_at_every_step(tmp_path, tiny_args):
    out = tmp_path / "run"
    base_lr, min_lr = 2e-3, 1e-5
    train(tiny_args(out, "train.epochs=2", "optim.warmup_epochs=0.5", f"optim.base_lr={base_lr}",
                    f"optim.min_lr={min_lr}", "train.log_every=1", "train.save_every=100"))
    peak, warmup, total = base_lr * 8 / 256, 4, 16  # 8 steps per epoch
    lrs = [r["lr"] for r in read_log(out)]
    assert len(lrs) == total
    for step, lr in enumerate(lrs, start=1):  # the line of step s reports the lr of the s-th update
        assert lr == pytest.approx(expected_lr(step - 1, peak, min_lr, warmup, total), rel=1e-9, abs=1e-15), step
    assert lrs[0] == 0.0 and lrs[warmup] == pytest.approx(peak)  # warmup starts at 0 and ends at the peak
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1 : warmup + 1]))
    assert all(a > b for a, b in zip(lrs[warmup:], lrs[warmup + 1 :]))
    assert min_lr < lrs[-1] < min_lr + 0.05 * (peak - min_lr)  # close to min_lr at the end


# ------------------------------------------------------------------------------------------------ resume


def plant_half_written_checkpoints(checkpoints: Path, complete: Path) -> None:
    """What a killed or broken writer could leave: a temporary dir with every file, a final-named dir without
    meta.json, and one whose meta.json does not say `complete`. All three have higher steps than `complete`."""
    tmp = checkpoints / ".tmp-step_00000014-999999"
    shutil.copytree(complete, tmp)
    no_meta = checkpoints / "step_00000008"
    shutil.copytree(complete, no_meta)
    (no_meta / META_FILE).unlink()
    not_complete = checkpoints / "step_00000010"
    shutil.copytree(complete, not_complete)
    meta = json.loads((not_complete / META_FILE).read_text())
    del meta["complete"]
    (not_complete / META_FILE).write_text(json.dumps({**meta, "step": 10}))


def test_resume_continues_exactly_where_the_uninterrupted_run_goes(tmp_path, tiny_args):
    common = ("train.epochs=2", "optim.base_lr=1e-3", "optim.warmup_epochs=0.5", "train.log_every=1")
    run_a, run_b, run_c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    # A: 16 steps without a break, a checkpoint every 2 steps, all kept.
    train(tiny_args(run_a, *common, "train.save_every=2", "train.keep_last=100"))
    # B: stopped after 6 steps, then resumed with resume=latest to the end.
    train(tiny_args(run_b, *common, "train.save_every=4", "train.stop_after_steps=6"))
    checkpoints_b = run_b / "checkpoints"
    assert find_latest(checkpoints_b) == checkpoints_b / "step_00000006"
    plant_half_written_checkpoints(checkpoints_b, checkpoints_b / "step_00000006")
    assert find_latest(checkpoints_b) == checkpoints_b / "step_00000006"  # the incomplete ones are never picked
    assert resolve_resume("latest", checkpoints_b) == checkpoints_b / "step_00000006"
    train(tiny_args(run_b, *common, "train.save_every=4", "train.resume=latest"))

    log_a, log_b = read_log(run_a), read_log(run_b)
    assert [r["step"] for r in log_b] == list(range(1, 17))  # 1..6 before the stop, 7..16 after the resume
    for a, b in zip(log_a, log_b):  # same lr at the same step, and the same losses: same data, masks, weights
        assert (b["step"], b["lr"], b["loss"]) == (a["step"], a["lr"], a["loss"])
    assert_same_weights(weights(checkpoints_b / "step_00000016"), weights(run_a / "checkpoints" / "step_00000016"))
    # The resumed run wrote only complete checkpoints and cleared the killed writer's temporary dir.
    assert not list(checkpoints_b.glob(".tmp-*"))
    assert find_latest(checkpoints_b) == checkpoints_b / "step_00000016"

    # C: resume=PATH from A's step 10 into a fresh output dir, stopped at step 12 -> A's step 12 exactly.
    train(tiny_args(run_c, *common, f"train.resume={run_a / 'checkpoints' / 'step_00000010'}",
                    "train.stop_after_steps=12"))
    log_c = read_log(run_c)
    assert [r["step"] for r in log_c] == [11, 12]
    assert [(r["lr"], r["loss"]) for r in log_c] == [(r["lr"], r["loss"]) for r in log_a[10:12]]
    assert_same_weights(weights(run_c / "checkpoints" / "step_00000012"), weights(run_a / "checkpoints" / "step_00000012"))


def test_resume_from_a_missing_or_incomplete_checkpoint_is_a_clear_error(tmp_path, tiny_args, capsys):
    missing = tmp_path / "nowhere" / "step_00000004"
    assert main(tiny_args(tmp_path / "run", f"train.resume={missing}")) == 2
    assert error_line(capsys) == f"error: resume checkpoint not found: {missing}"

    incomplete = tmp_path / "step_00000004"
    incomplete.mkdir()
    (incomplete / MODEL_FILE).write_bytes(b"")
    assert main(tiny_args(tmp_path / "run", f"train.resume={incomplete}")) == 2
    line = error_line(capsys)
    assert "incomplete" in line and str(incomplete) in line
    assert not (tmp_path / "run" / "log.jsonl").exists()  # stopped before training


def test_resume_latest_without_any_checkpoint_starts_from_scratch(tmp_path, tiny_args):
    out = tmp_path / "run"
    train(tiny_args(out, "train.resume=latest", "train.stop_after_steps=2", "train.log_every=1"))
    assert [r["step"] for r in read_log(out)] == [1, 2]


def test_a_fresh_run_never_mixes_into_an_earlier_runs_checkpoints(tmp_path, tiny_args, capsys):
    out = tmp_path / "run"
    train(tiny_args(out, "train.stop_after_steps=2", "train.log_every=1"))
    # a second fresh run into the same folder is refused, naming what is there and the ways out
    assert main(tiny_args(out, "train.stop_after_steps=3", "train.log_every=1")) == 2
    line = error_line(capsys)
    assert str(out) in line and "step_00000002" in line and "train.resume=latest" in line and "train.overwrite=true" in line
    assert [r["step"] for r in read_log(out)] == [1, 2]  # untouched, and so is the earlier run's config
    assert load_config(MAEPretrainConfig, out / "config.yaml").train.stop_after_steps == 2
    # overwrite replaces the earlier run: its log and checkpoints are gone
    train(tiny_args(out, "train.stop_after_steps=3", "train.log_every=1", "train.overwrite=true"))
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step_00000003"]


# ------------------------------------------------------------------------------------------------ checkpoints


def fake_checkpoint(root: Path, step: int, keep_last: int = 3, size: int = 16) -> Path:
    model = {"weight": torch.full((size,), float(step)), "bias": torch.zeros(2)}
    train_state = {"step": step, "optimizer": {"state": {}, "param_groups": []}}
    return save_checkpoint(root, step, model, train_state, {"epoch": step / 10}, {"model_name": "x"}, keep_last)


def test_keep_last_prunes_old_checkpoints_but_never_the_one_just_written(tmp_path):
    root = tmp_path / "checkpoints"
    for step in range(1, 6):
        fake_checkpoint(root, step, keep_last=2)
    assert [p.name for p in list_checkpoints(root)] == ["step_00000004", "step_00000005"]

    # A run resumed from an older step saves below newer checkpoints: its checkpoint must survive pruning.
    written = fake_checkpoint(root, 3, keep_last=2)
    assert written.is_dir() and is_complete(written)
    # A half-written directory does not count towards keep_last (and is never picked).
    broken = root / "step_00000009"
    shutil.copytree(root / "step_00000005", broken)
    (broken / META_FILE).unlink()
    fake_checkpoint(root, 6, keep_last=2)
    assert [p.name for p in list_checkpoints(root) if is_complete(p)] == ["step_00000005", "step_00000006"]
    assert find_latest(root) == root / "step_00000006"
    state_dict, metadata = read_weights(root / "step_00000006")
    assert torch.equal(state_dict["weight"], torch.full((16,), 6.0)) and metadata == {"model_name": "x"}


KILLED_WRITER = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    import torch
    from pretrain import checkpoint

    root, ready, stall_in = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    model = lambda step: {"weight": torch.full((4_000_000,), float(step)), "bias": torch.full((8,), float(step))}
    for step in (1, 2):
        checkpoint.save_checkpoint(root, step, model(step), {"step": step}, {"epoch": 0}, keep_last=5)

    def stall():  # tell the test where we are, then hang as if the disk were slow, until killed
        ready.write_text(stall_in)
        time.sleep(600)

    if stall_in == "torch.save":  # the train state is half on disk
        real_save = torch.save
        def save_half_then_stall(obj, path, *args, **kwargs):
            real_save(obj, path, *args, **kwargs)
            with open(path, "r+b") as f:
                f.truncate(f.seek(0, 2) // 2)
            stall()
        torch.save = save_half_then_stall
    else:  # the first rename of the save has happened
        real_replace = os.replace
        def replace_then_stall(src, dst):
            real_replace(src, dst)
            stall()
        os.replace = replace_then_stall
    checkpoint.save_checkpoint(root, 3, model(3), {"step": 3, "big": torch.zeros(1_000_000)}, {"epoch": 0})
    """
)


@pytest.mark.parametrize("stall_in", ["torch.save", "os.replace"])
def test_a_writer_killed_mid_save_leaves_only_complete_loadable_checkpoints(tmp_path, stall_in):
    """SIGKILL a process in the middle of its third save: while writing the train state, or right after the first
    rename (the commit point of an atomic save: a non-atomic one would leave a final-named partial dir here)."""
    root, ready = tmp_path / "checkpoints", tmp_path / "ready"
    script = tmp_path / "writer.py"
    script.write_text(KILLED_WRITER)
    writer = subprocess.Popen([sys.executable, str(script), str(root), str(ready), stall_in], cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert writer.poll() is None, f"the writer exited early with status {writer.returncode}"
            assert time.monotonic() < deadline, "the writer never reached the middle of its third save"
            time.sleep(0.05)
        os.kill(writer.pid, signal.SIGKILL)
        assert writer.wait(timeout=30) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()

    # Whatever the moment of death: every directory under a final name is complete, and the latest loads.
    assert all(is_complete(path) for path in list_checkpoints(root))
    latest = find_latest(root)
    assert latest == resolve_resume("latest", root)
    step = int(latest.name.split("_")[1])
    state_dict, _ = read_weights(latest)
    assert torch.equal(state_dict["weight"], torch.full((4_000_000,), float(step)))
    assert load_train_state(latest)["step"] == step

    if stall_in == "torch.save":  # killed before the rename: step 3 never appears, its temporary dir remains
        assert latest == root / "step_00000002"
        (leftover,) = root.glob(".tmp-step_00000003-*")
        assert (leftover / MODEL_FILE).is_file() and not (leftover / META_FILE).exists()
    else:  # killed after the rename: step 3 is there in full
        assert latest == root / "step_00000003"
        assert not list(root.glob(".tmp-*"))

    # The next save (another process) completes and clears any dead writer's leftovers.
    fake_checkpoint(root, 4)
    assert find_latest(root) == root / "step_00000004" and not list(root.glob(".tmp-*"))


# ------------------------------------------------------------------------------------------------ non-finite loss


class NaNAtStep3(MAETask):
    """The real MAE task, but the loss of the third optimizer step is NaN (as after a diverging update)."""

    def __init__(self, mask_ratio: float):
        super().__init__(mask_ratio)
        self.calls = 0

    def __call__(self, model, batch):
        outputs = super().__call__(model, batch)
        self.calls += 1
        if self.calls == 3:
            outputs["loss"] = outputs["loss"] * float("nan")
        return outputs


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_args, monkeypatch, capsys):
    monkeypatch.setattr("pretrain.train_mae.MAETask", NaNAtStep3)
    overrides = ("train.save_every=1", "train.log_every=1", "optim.base_lr=1e-3")

    out = tmp_path / "direct"
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 3 ") as raised:
        run_mae(load_config(MAEPretrainConfig, None, tiny_args(out, *overrides)))
    good = out / "checkpoints" / "step_00000002"
    assert f"The last good checkpoint is {good}." in str(raised.value)
    assert find_latest(out / "checkpoints") == good
    assert [r["step"] for r in read_log(out)] == [1, 2]

    out = tmp_path / "cli"
    assert main(tiny_args(out, *overrides)) == 3
    line = error_line(capsys)
    assert "at step 3 " in line and str(out / "checkpoints" / "step_00000002") in line
    assert find_latest(out / "checkpoints") == out / "checkpoints" / "step_00000002"
    assert not (out / "checkpoints" / "step_00000003").exists()


# ------------------------------------------------------------------------------------------------ the demo command


def run_demo(output_dir: Path, cache: Path, *overrides: str, env: dict | None = None) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "pretrain", "--config", str(DEMO_CONFIG),
        "train.epochs=1", "train.stop_after_steps=3", "train.batch_size=32", f"output_dir={output_dir}",
        f"data.cache_dir={cache}", "logging.progress_bar=false", *overrides,
    ]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


def assert_demo_outputs(output_dir: Path, result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    last = read_log(output_dir)[-1]  # the last step is always logged
    assert last["step"] == 3 and math.isfinite(last["loss"])
    assert find_latest(output_dir / "checkpoints") == output_dir / "checkpoints" / "step_00000003"
    for name in ("config.yaml", "reconstructions.png", "loss_curve.png"):
        assert (output_dir / name).is_file(), name


def test_demo_command_end_to_end(tmp_path, embedded_cache):
    out = tmp_path / "demo"
    result = run_demo(out, embedded_cache, "logging.wandb=disabled")
    assert_demo_outputs(out, result)
    assert not (out / "wandb").exists()
    assert load_config(MAEPretrainConfig, out / "config.yaml").model.name == "mae_vit_tiny_patch4"


def test_demo_command_with_offline_wandb_needs_no_network(tmp_path, embedded_cache):
    out = tmp_path / "demo"
    closed_port = "http://127.0.0.1:9"  # any attempt to reach a server or a proxy is refused at once
    env = {
        "WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_BASE_URL": closed_port,
        "HTTP_PROXY": closed_port, "HTTPS_PROXY": closed_port, "NO_PROXY": "",
        "WANDB_DIR": str(tmp_path / "wandb_dir"), "WANDB_CONFIG_DIR": str(tmp_path / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb_cache"), "WANDB_DATA_DIR": str(tmp_path / "wandb_data"),
    }
    result = run_demo(out, embedded_cache, "logging.wandb=offline", "data.image_size=16", env=env)
    assert_demo_outputs(out, result)
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")  # the run is written under output_dir
    records = run_file.read_bytes()
    assert b"images_per_s" in records and b"mae_vit_tiny_patch4" in records  # the logged metrics and the config


# ------------------------------------------------------------------------------------------------ bad data in a run


def write_shards_with_garbage(directory: Path, good: int, garbage: int, num_shards: int = 2) -> Path:
    """Labelled shards holding `good` real images and `garbage` samples whose "png" is not an image."""
    from data import ShardWriter, read_embedded
    import itertools

    _, samples = read_embedded()
    members = [{"__key__": f"good{i:05d}", "png": s.image_bytes, "cls": str(s.label).encode()}
               for i, s in enumerate(itertools.islice(iter(samples), good))]
    members += [{"__key__": f"junk{i:05d}", "png": b"not an image at all", "cls": b"0"} for i in range(garbage)]
    members.sort(key=lambda m: m["__key__"][-3:])  # interleave good and bad
    per_shard = -(-len(members) // num_shards)
    with ShardWriter(directory, max_samples=per_shard) as writer:
        for member in members:
            writer.write(member)
    return directory


def test_skipped_samples_are_logged_by_reason_with_the_training_metrics(tmp_path, tiny_args):
    shards = write_shards_with_garbage(tmp_path / "shards", good=60, garbage=6)
    out = tmp_path / "run"
    train(tiny_args(out, f"data.train={shards}", "train.log_every=2", "train.stop_after_steps=6"))
    log = read_log(out)
    total = sum(r["skipped_samples"] for r in log)
    assert total > 0 and total == sum(r["skipped"].get("undecodable_image", 0) for r in log)
    assert all(set(r["skipped"]) <= {"undecodable_image"} for r in log)


def test_a_run_over_all_garbage_data_stops_with_a_clear_message(tmp_path, tiny_args, capsys):
    shards = write_shards_with_garbage(tmp_path / "shards", good=0, garbage=64)
    status = main(tiny_args(tmp_path / "run", f"data.train={shards}", "data.max_skip_rate=0.5"))
    assert status == 2
    line = error_line(capsys)
    assert re.search(r"\d+ of \d+ samples skipped \(undecodable_image: \d+\), more than the allowed 50%", line), line
