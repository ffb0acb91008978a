"""The Fashion-MNIST benchmarks' shared steps: wall times kept across invocations, runs of another recipe found."""
from __future__ import annotations

import json
from pathlib import Path

from benchmark_helpers import load_benchmark

fmnist_steps = load_benchmark("fmnist_steps")
StepSeconds = fmnist_steps.StepSeconds
REPO = Path(__file__).resolve().parents[1]


def test_step_seconds_survive_a_new_invocation_and_add_up_a_resumed_run(tmp_path):
    path = tmp_path / "seconds" / "bench.json"
    first = StepSeconds(path)
    first.record("pretraining", 100.0)
    first.record("probe", 5.0)
    assert json.loads(path.read_text()) == {"pretraining": 100.0, "probe": 5.0}

    # a later invocation: the pretraining resumed after a stop adds its part, the probe run again replaces its time
    second = StepSeconds(path)
    assert second == {"pretraining": 100.0, "probe": 5.0}
    second.record("pretraining", 40.0, resumed=True)
    second.record("probe", 7.0)
    assert StepSeconds(path) == {"pretraining": 140.0, "probe": 7.0}
    assert not list(path.parent.glob("*.partial"))


def test_a_run_of_another_recipe_is_told_apart_from_one_to_resume_or_skip(tmp_path):
    from finetune.config import FinetuneConfig
    from pretrain.config import load_config, save_config

    config = REPO / "configs/distill_vit_tiny_fmnist.yaml"
    out = tmp_path / "distill_hard"
    assert fmnist_steps.recipe_changes(out, FinetuneConfig, config, []) == []  # nothing there yet
    overrides = [f"output_dir={out}", "distillation.teacher=runs/teacher_a", "train.epochs=3"]
    save_config(load_config(FinetuneConfig, config, overrides), out / "config.yaml")  # as `python -m finetune` does

    # the same recipe, kept or shown differently: resume or skip it
    assert fmnist_steps.recipe_changes(out, FinetuneConfig, config, [
        *overrides, "train.resume=latest", "train.save_every=7", "logging.progress_bar=false"]) == []
    # another teacher, another schedule: not a result of this recipe
    assert fmnist_steps.recipe_changes(out, FinetuneConfig, config, [
        *overrides, "distillation.teacher=runs/teacher_b", "train.epochs=4"]) == ["distillation.teacher", "train.epochs"]
