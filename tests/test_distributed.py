"""Real 2-process runs (torchrun, gloo on CPU) of the MAE engine and the linear probe."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def torchrun(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", module, *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def two_process_mae(tmp_path_factory, tiny_shards):
    train_dir, val_dir = tiny_shards
    out = tmp_path_factory.mktemp("ddp") / "mae"
    result = torchrun("pretrain", f"output_dir={out}", f"data.train={train_dir}", f"data.val={val_dir}",
                      "data.image_size=16", "data.num_workers=0", "data.shuffle_buffer=8", "train.batch_size=8",
                      "train.epochs=1", "train.log_every=1", "train.mixed_precision=no", "logging.wandb=disabled",
                      "logging.progress_bar=false", "num_pictures=2")
    return out, result


def test_two_processes_share_one_global_batch_and_one_log(two_process_mae):
    out, result = two_process_mae
    assert "global batch 16 = 8 per device x 2 processes x 1 accumulation" in result.stderr
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # 64 training images / global batch 16 = 4 steps, each logged once (only the main process writes)
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["loss"] > 0 for r in log)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000004"]
    assert (out / "reconstructions.png").is_file()


def test_two_process_linear_probe_counts_every_evaluation_image_once(two_process_mae, tiny_shards, tmp_path):
    mae_dir, _ = two_process_mae
    train_dir, val_dir = tiny_shards
    out = tmp_path / "probe"
    torchrun("finetune", f"output_dir={out}", f"encoder.checkpoint={mae_dir}", f"data.train={train_dir}",
             f"data.val={val_dir}", "data.image_size=16", "data.num_workers=0", "train.batch_size=8",
             "train.epochs=2", "train.mixed_precision=no", "optim.warmup_epochs=1", "logging.wandb=disabled",
             "logging.progress_bar=false", "feature_batch_size=8")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 16 and metrics["num_train"] == 64  # split across processes, nothing twice
    assert 0 <= metrics["top1"] <= metrics["top5"] <= 100
