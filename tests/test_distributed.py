"""Real 2-process runs (torchrun or accelerate launch, gloo on CPU): the MAE and CLIP engines, the linear probe,
the data split, the shipped accelerate configs and the SLURM script."""
from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
TINY_RUN = ["data.num_workers=0", "train.mixed_precision=no", "logging.wandb=disabled", "logging.progress_bar=false"]


def launch(command: list[str], timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO, env=env or ENV, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def torchrun(module: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                   "-m", module, *args], timeout)


@pytest.fixture(scope="module")
def two_process_mae(tmp_path_factory, tiny_shards):
    train_dir, val_dir = tiny_shards
    out = tmp_path_factory.mktemp("ddp") / "mae"
    result = torchrun("pretrain", f"output_dir={out}", f"data.train={train_dir}", f"data.val={val_dir}",
                      "data.image_size=16", "data.num_workers=0", "data.shuffle_buffer=8", "train.batch_size=8",
                      "train.epochs=1", "train.log_every=1", "train.mixed_precision=no", "logging.wandb=disabled",
                      "logging.progress_bar=false", "num_pictures=2", "eval.every_epochs=1")
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


def test_two_processes_take_the_main_process_attention_kernels(tiny_shards, tmp_path):
    """train.attention timed in bf16: the main process times the kernels after the first step, every process takes
    its choice (broadcast), it is logged once and checkpointed."""
    from pretrain.checkpoint import find_latest, load_train_state

    train_dir, val_dir = tiny_shards
    out = tmp_path / "mae"
    result = torchrun("pretrain", f"output_dir={out}", f"data.train={train_dir}", f"data.val={val_dir}",
                      "data.image_size=16", "data.shuffle_buffer=8", "train.batch_size=8", "train.stop_after_steps=2",
                      "num_pictures=2", *[a for a in TINY_RUN if "mixed_precision" not in a],
                      "train.mixed_precision=bf16", "train.attention=timed")
    assert result.stderr.count("attention kernels (bf16") == 1
    kernels = load_train_state(find_latest(out / "checkpoints"))["attention_kernels"]
    assert kernels and set(kernels.values()) <= {"fused", "math"}


def test_two_process_knn_monitoring_equals_the_one_process_knn_task(two_process_mae, tiny_shards, tmp_path):
    """Each process extracts its share of the bank and of the evaluation images (the bank gathered, the counts
    summed): the same numbers as the `knn` task on the run's checkpoint in one process."""
    from finetune.cli import main as finetune_main

    mae_dir, _ = two_process_mae
    train_dir, val_dir = tiny_shards
    monitored = json.loads((mae_dir / "metrics.json").read_text())
    assert (monitored["num_knn_images"], monitored["num_knn_bank"]) == (16, 64)  # every image once
    out = tmp_path / "knn"
    assert finetune_main(["task=knn", f"encoder.checkpoint={mae_dir}", f"data.train={train_dir}", f"data.val={val_dir}",
                          "data.image_size=16", "train.batch_size=8", "k=[20]", f"output_dir={out}", *TINY_RUN]) == 0
    task = json.loads((out / "metrics.json").read_text())
    assert task["k"]["20"] == {"top1": monitored["knn_top1"], "top5": monitored["knn_top5"]}


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


def test_two_process_clip_training_logs_once_and_exports(tiny_pair_shards, tmp_path):
    """The contrastive loss and gradients of 2 processes equal 1 process's: tests/test_clip.py. Here: the real
    entry point under torchrun. data.val stays the demo's "embedded", whose caption pairs the main process writes
    inside the process group (that once crashed in webdataset's single-node check)."""
    from clip_helpers import write_tiny_clip_config

    config = write_tiny_clip_config(tmp_path)
    out = tmp_path / "clip"
    result = torchrun("pretrain", "--config", str(REPO / "configs/clip_vit_tiny_demo.yaml"), f"output_dir={out}",
                      f"model.open_clip_config={config}", f"data.train={tiny_pair_shards}", "data.image_size=16",
                      "data.shuffle_buffer=16", "train.batch_size=8", "train.epochs=1", "train.log_every=1",
                      *TINY_RUN)
    assert "global batch 16 = 8 per device x 2 processes x 1 accumulation" in result.stderr
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # 64 pairs / 16 per step, each step logged once
    assert all(math.isfinite(r["loss"]) and 0 <= r["image_to_text_acc"] <= 1 for r in log)
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_00000004"]
    assert (out / "open_clip" / "open_clip_model.safetensors").is_file()


def test_two_processes_split_the_data_with_no_sample_read_twice(tmp_path):
    """2 processes x 2 DataLoader workers over 8 shards: evaluation reads every sample exactly once; each pass of
    finite training too, and the second pass is shuffled differently."""
    from data import ShardOptions, read_embedded, write_labelled_shards

    class_names, samples = read_embedded()
    first = list(itertools.islice(iter(samples), 64))
    write_labelled_shards(first, tmp_path / "shards", class_names, options=ShardOptions(shard_size=8, progress=False))
    report = tmp_path / "keys.json"
    # 64 samples / (2 processes x batch 4) = 8 batches per process and pass
    launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            str(REPO / "tests/distributed_data_split.py"), str(tmp_path / "shards"), str(report), "8"],
           env={**ENV, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])})
    ranks = json.loads(report.read_text())
    expected = sorted(sample.key for sample in first)
    for mode in ("evaluation", "pass 1", "pass 2"):
        keys = ranks[0][mode] + ranks[1][mode]
        assert sorted(keys) == expected, mode
        assert ranks[0][mode] and ranks[1][mode]  # both processes did their share
    assert ranks[0]["pass 1"] != ranks[0]["pass 2"]


@pytest.mark.parametrize("name", sorted(path.name for path in (REPO / "configs/accelerate").glob("*.yaml")))
def test_shipped_accelerate_configs_load(name):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(REPO / "configs/accelerate" / name))
    assert config.distributed_type in ("MULTI_GPU", "FSDP")
    assert config.num_processes == config.num_machines * 8


def tiny_mae_args(output_dir: Path, tiny_shards) -> list[str]:
    """A 2-step run of the demo MAE on 16x16 images (the micro test model is registered only in this process)."""
    train_dir, val_dir = tiny_shards
    return [f"output_dir={output_dir}", f"data.train={train_dir}", f"data.val={val_dir}", "data.image_size=16",
            "data.shuffle_buffer=8", "train.batch_size=8", "train.stop_after_steps=2", "train.log_every=1",
            "num_pictures=2", *TINY_RUN]


def test_accelerate_launch_with_the_shipped_ddp_config(tiny_shards, tmp_path):
    """The single-machine DDP config, with 2 processes instead of 8: on CPU, accelerate starts gloo processes."""
    out = tmp_path / "mae"
    result = launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                     str(REPO / "configs/accelerate/ddp_1node_8gpu.yaml"), "--num_processes", "2",
                     "-m", "pretrain", *tiny_mae_args(out, tiny_shards)])
    assert "global batch 16 = 8 per device x 2 processes" in result.stderr
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]


def test_slurm_script_starts_one_launcher_per_node(tiny_shards, tmp_path):
    """configs/slurm/pretrain_multinode.sbatch on a pretend one-node allocation with 2 "GPUs": srun and scontrol
    are stand-ins that run the command here, so what is tested is the script's own arithmetic and command."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == --* ]]; do shift; done\nSLURM_NODEID=0 exec "$@"\n')
    (bin_dir / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    path = os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])  # + accelerate's CLI
    env = {**ENV, "PATH": path, "SLURM_JOB_NODELIST": "node1",
           "SLURM_NNODES": "1", "SLURM_GPUS_ON_NODE": "2", "SLURM_CPUS_PER_TASK": "2", "MAIN_PORT": "29533"}
    out = tmp_path / "mae"
    config = REPO / "configs/mae_vit_tiny_demo.yaml"
    result = launch(["bash", str(REPO / "configs/slurm/pretrain_multinode.sbatch"), str(config),
                     *tiny_mae_args(out, tiny_shards)], env=env)
    assert "global batch 16 = 8 per device x 2 processes" in result.stderr
    assert [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()] == [1, 2]
