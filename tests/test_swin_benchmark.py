"""benchmarks/swin_fmnist.py: its summary rows, its three configs (the small Swin pretrained by UM-MAE / SimMIM, and
finetuned from either or from scratch as the same architecture), and its --smoke run end to end, then skipped."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.config import FinetuneConfig
from pretrain.config import MAEPretrainConfig, load_config
from pretrain.encoders import build_encoder, spec_for_pretrained
from pretrain.models import create_model

from benchmark_helpers import load_benchmark

REPO = Path(__file__).resolve().parents[1]
FMNIST_MEAN, FMNIST_STD = (0.286,) * 3, (0.353,) * 3

pytestmark = pytest.mark.usefixtures("single_thread")


load = load_benchmark


def test_summary_rows_hold_each_pretrained_swin_against_scratch_as_its_target():
    finetuned = {"UM-MAE pretrained": {"top1": 91.2}, "SimMIM pretrained": {"top1": 89.9},
                 "from scratch": {"top1": 90.4}}
    assert load("swin_fmnist").summary_rows(finetuned) == [
        {"row": "UM-MAE Swin -> finetune", "metric": "top-1 (%)", "value": 91.2, "target": 90.4,
         "target_label": "from scratch", "baselines": {"same Swin from scratch": 90.4}},
        {"row": "SimMIM Swin -> finetune", "metric": "top-1 (%)", "value": 89.9, "target": 90.4,
         "target_label": "from scratch", "baselines": {"same Swin from scratch": 90.4}},
    ]


@pytest.mark.parametrize("config, model, mask_ratio, out", [
    ("ummae_swin_tiny_fmnist.yaml", "ummae_swin_tiny_cpu", 0.75, "runs/bench_fmnist/ummae_swin"),
    ("simmim_swin_tiny_fmnist.yaml", "simmim_swin_tiny_cpu", 0.6, "runs/bench_fmnist/simmim_swin"),
])
def test_pretraining_configs_train_the_demo_swins_on_the_full_split(config, model, mask_ratio, out):
    demo = load_config(MAEPretrainConfig, REPO / "configs" / config.replace("fmnist", "demo"))
    cfg = load_config(MAEPretrainConfig, REPO / "configs" / config)
    # both regress per-patch-normalised pixels (SimMIM's fmnist target was chosen on a carve of the training split)
    assert cfg.model == dataclasses.replace(demo.model, norm_pix_loss=True)
    assert (cfg.data.crop_scale, cfg.optim) == (demo.data.crop_scale, demo.optim)
    assert cfg.model.name == model and cfg.model.mask_ratio == mask_ratio and cfg.output_dir == out
    assert (cfg.data.train, cfg.data.val) == ("runs/bench_fmnist/shards/train", "runs/bench_fmnist/shards/val")
    assert (cfg.data.image_size, cfg.data.mean, cfg.data.std) == (32, FMNIST_MEAN, FMNIST_STD)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.optim.warmup_epochs) == (6, 128, 1.0)
    assert cfg.eval.every_epochs == 1 and cfg.logging.wandb == "offline"


def test_finetuning_config_builds_the_pretrained_swin_from_scratch_too():
    cfg = load_config(FinetuneConfig, REPO / "configs/finetune_swin_tiny_fmnist.yaml")
    recipe = load_config(FinetuneConfig, REPO / "configs/finetune_mae_tiny_fmnist.yaml")
    # the ViT's optimiser and train section but a shorter budget (4 epochs: the Swin row fits one session); the
    # augmentation, lr and layer decay the Swin row was measured with (the ViT's have moved on, each chosen on a
    # carve; its layer decay with its depth)
    assert dataclasses.replace(cfg.optim, base_lr=recipe.optim.base_lr) == recipe.optim and cfg.optim.base_lr == 1e-3
    assert cfg.layer_decay == 0.75
    assert dataclasses.replace(cfg.train, epochs=recipe.train.epochs) == recipe.train and cfg.train.epochs == 4
    assert (cfg.data.mean, cfg.data.std) == (FMNIST_MEAN, FMNIST_STD)
    assert cfg.augment.rand_augment == "rand-m3-mstd0.5-inc1" and cfg.data.crop_scale == (0.5, 1.0)
    assert cfg.encoder.checkpoint == "runs/bench_fmnist/ummae_swin" and cfg.encoder.global_pool is None
    # the scratch baseline (checkpoint null) is the SwinTransformer both pretraining models' checkpoints load into
    scratch = build_encoder(load_config(FinetuneConfig, REPO / "configs/finetune_swin_tiny_fmnist.yaml",
                                        ["encoder.checkpoint=null"]).encoder, 32, num_classes=10)
    assert type(scratch.model).__name__ == "SwinTransformer" and scratch.spec["builder"] == "swin"
    for name in ("ummae_swin_tiny_cpu", "simmim_swin_tiny_cpu"):
        assert spec_for_pretrained(create_model(name), 32)["kwargs"] == scratch.spec["kwargs"], name


def test_smoke_run_finishes_then_a_second_run_skips_every_step(tmp_path):
    """About 30 s on a busy 2-core machine: five runs of 8 steps on the bundled images."""
    command = [sys.executable, str(REPO / "benchmarks/swin_fmnist.py"), "--smoke", "--work-dir", str(tmp_path / "work"),
               "--json", str(tmp_path / "swin.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    result = json.loads((tmp_path / "swin.json").read_text())
    assert [row["initialisation"] for row in result["rows"]] == ["UM-MAE pretrained", "SimMIM pretrained",
                                                                 "from scratch"]
    assert "random init (ummae_swin_tiny_cpu)" in result["rows"][2]["model"]
    assert all("MAE checkpoint" in row["model"] and row["classifier"] == "SwinTransformer"
               for row in result["rows"][:2])
    assert [row["value"] for row in result["summary"]] == [row["top1"] for row in result["rows"][:2]]
    assert {method: p["steps"] for method, p in result["pretraining"].items()} == {"UM-MAE": 8, "SimMIM": 8}
    assert all(p["knn_top1"] for p in result["pretraining"].values())

    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert second.stdout.count("done earlier") == 5 and "--config" not in second.stdout
    # the steps skipped as done keep the wall times the first run measured
    seconds = result["seconds"]
    assert set(seconds) == {"UM-MAE pretraining", "SimMIM pretraining", "finetune from UM-MAE",
                            "finetune from SimMIM", "train from scratch"} and min(seconds.values()) > 0
    assert json.loads((tmp_path / "swin.json").read_text())["seconds"] == seconds
    table = first.stdout[first.stdout.index("| initialisation"):]
    assert second.stdout.endswith(table)

    # one method's runs alone: the others' figures are kept from the JSON file
    third = subprocess.run([*command, "--part", "SimMIM"], cwd=REPO, env=env, capture_output=True, text=True,
                           timeout=300)
    assert third.returncode == 0, third.stderr[-3000:]
    assert third.stdout.count("done earlier") == 2 and "SimMIM" in third.stdout.split("done earlier")[0]
    assert json.loads((tmp_path / "swin.json").read_text())["rows"] == result["rows"]
    assert third.stdout.endswith(table)


def test_a_pretraining_run_is_skipped_when_done_resumed_when_interrupted_and_redone_for_another_recipe(tmp_path,
                                                                                                     capsys):
    """fmnist_steps.pretrain (every benchmark's masked-image pretraining step): a finished run is kept, one stopped
    before its end continues from its latest checkpoint, and a folder holding another recipe's run starts over."""
    swin = load("swin_fmnist")
    work = tmp_path / "work"
    shards = work / "shards"
    swin.prepare_shards(None, shards, True, swin.StepSeconds(work / "seconds.json"))
    common = ["train.epochs=1", f"data.train={shards / 'train'}", f"data.val={shards / 'val'}", *swin.SMOKE,
              *swin.SMOKE_PRETRAIN, "data.samples_per_epoch=128", "eval.every_epochs=0"]
    seconds = swin.StepSeconds(work / "seconds.json")
    out, config = work / "simmim_swin", swin.PRETRAIN_CONFIGS["SimMIM"]
    first = swin.pretrain("SimMIM pretraining", config, out, common, seconds)
    assert first["steps"] == 4 and "train.overwrite=true" in capsys.readouterr().out
    assert swin.pretrain("SimMIM pretraining", config, out, common, seconds) == first
    assert "done earlier" in capsys.readouterr().out

    (out / "reconstructions.png").unlink()  # as if stopped after its last checkpoint, before the picture
    assert swin.pretrain("SimMIM pretraining", config, out, common, seconds)["steps"] == 4
    assert "train.resume=latest" in capsys.readouterr().out and (out / "reconstructions.png").is_file()

    swin.pretrain("SimMIM pretraining", config, out, [*common, "model.mask_ratio=0.5"], seconds)
    assert "holds a run of another recipe (model.mask_ratio): starting over" in capsys.readouterr().out
    assert load_config(MAEPretrainConfig, out / "config.yaml").model.mask_ratio == 0.5
