"""The Fashion-MNIST benchmarks' shared steps: wall times kept across invocations, runs of another recipe found,
one part of a benchmark rerun while the other's figures are kept."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmark_helpers import load_benchmark

fmnist_steps = load_benchmark("fmnist_steps")


def steps_of(benchmark):
    """The fmnist_steps module `benchmark` imported (load_benchmark loads a fresh one each time): the one whose
    `run` its run_or_resume calls."""
    import sys

    return sys.modules[benchmark.run_or_resume.__module__]
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


def test_step_seconds_record_each_stretch_and_the_machine_it_ran_on(tmp_path, monkeypatch):
    """A step resumed in another session may run on another CPU: each stretch keeps its seconds and machine (a
    run started over keeps only its own), a step dropped as timed elsewhere loses them, and a results file's
    `machines` keep an earlier file's stretches for the steps this invocation did not touch."""
    machine = load_benchmark("machine")
    here = machine.describe()  # measured for real: the CPU, its cores, a matmul rate
    assert here["cpu"] and here["cores"] >= 1 and here["matmul_gflops"]["float32"] > 0
    assert ("bfloat16" in here["matmul_gflops"]) == bool(here["bf16_units"])

    fast, slow = ({"cpu": "AMD EPYC", "cores": 2, "bf16_units": ["avx512_bf16"],
                   "matmul_gflops": {"float32": rate // 2, "bfloat16": rate}} for rate in (396, 210))
    monkeypatch.setattr(fmnist_steps, "describe_machine", lambda: fast)
    path = tmp_path / "seconds" / "bench.json"
    seconds = StepSeconds(path)
    seconds.record("finetune from MAE", 100.0)  # stopped by the session's end
    seconds.record("probe", 5.0)
    monkeypatch.setattr(fmnist_steps, "describe_machine", lambda: slow)
    seconds = StepSeconds(path)  # the next session
    seconds.record("finetune from MAE", 300.0, resumed=True)
    seconds.record("probe", 6.0)  # run again from the start
    stretches = json.loads(path.with_suffix(".machines.json").read_text())
    assert [(s["seconds"], s["machine"]["matmul_gflops"]["bfloat16"]) for s in stretches["finetune from MAE"]] == [
        (100.0, 396), (300.0, 210)]
    assert [(s["seconds"], s["machine"]) for s in stretches["probe"]] == [(6.0, slow)]
    assert stretches["probe"][0]["ended"].endswith(" UTC")
    assert StepSeconds(path) == {"finetune from MAE": 400.0, "probe": 6.0}

    earlier = {"seconds": {"teacher": 50.0, "probe": 1.0},
               "machines": {"teacher": [{"seconds": 50.0, "machine": fast}], "probe": [{"seconds": 1.0}]}}
    timing = StepSeconds(path).timing(earlier)  # nothing touched in this invocation: the earlier file fills in
    assert timing["seconds"] == {"teacher": 50.0, "finetune from MAE": 400.0, "probe": 6.0}
    assert timing["machines"]["teacher"] == earlier["machines"]["teacher"]
    assert timing["machines"]["probe"] == stretches["probe"]

    # a run found done that another script timed: its time and stretches go
    out = tmp_path / "probe_run"
    out.mkdir()
    (out / fmnist_steps.TIMED_BY).write_text(json.dumps({"step": "probe", "seconds_file": "other.json"}))
    StepSeconds(path).found_done("probe", out)
    assert "probe" not in json.loads(path.with_suffix(".machines.json").read_text())
    assert StepSeconds(path) == {"finetune from MAE": 400.0}


def test_a_stopped_run_keeps_its_time_and_a_run_timed_by_another_script_is_counted_once(tmp_path, monkeypatch):
    """run_or_resume records a run stopped by a signal (the resume adds on), and a script that finds a run done
    which another script trained and timed drops its own older time for that step (the run counts in the trainer's
    file only); --part runs keep an earlier file's times for the steps they did not touch."""
    from types import SimpleNamespace

    from pretrain.config import MAEPretrainConfig

    out = tmp_path / "mae"
    clock = iter([0.0, 30.0, 100.0, 140.0, 200.0, 290.0])
    monkeypatch.setattr(fmnist_steps, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    calls = []

    def stopped_then_finished(step, main, argv):
        calls.append(argv)
        (out / "checkpoints" / "step_00000005").mkdir(parents=True, exist_ok=True)
        if len(calls) == 1:
            raise SystemExit(f"{step} failed with exit status 143")  # SIGTERM, after a checkpoint
        (out / "reconstructions.png").write_bytes(b"png")
        return 0.0
    monkeypatch.setattr(fmnist_steps, "run", stopped_then_finished)
    monkeypatch.setattr(fmnist_steps, "find_latest", lambda root: max(Path(root).glob("step_*"), default=None))

    def pretrain(seconds):
        fmnist_steps.run_or_resume("MAE pretraining", None, MAEPretrainConfig, fmnist_steps.MAE_CONFIG, out,
                                   [f"output_dir={out}"], lambda: (out / "reconstructions.png").is_file(), seconds)

    probe = StepSeconds(tmp_path / "seconds" / "linear_probe.json")
    with pytest.raises(SystemExit):
        pretrain(probe)
    assert StepSeconds(probe.path) == {"MAE pretraining": 30.0}  # the stretch before the stop
    pretrain(probe)  # resumed: adds its 40 s
    assert "train.resume=latest" in calls[1] and StepSeconds(probe.path) == {"MAE pretraining": 70.0}

    # finetune_fmnist.py had timed an older MAE in the same folder; it finds this one done and drops that time
    finetune = StepSeconds(tmp_path / "seconds" / "finetune_fmnist.json")
    finetune.record("MAE pretraining", 1594.0)
    finetune.record("train the teacher", 4000.0)
    finetune = StepSeconds(finetune.path)  # a later invocation
    pretrain(finetune)
    pretrain(probe)  # the trainer's own file keeps its time
    assert len(calls) == 2
    assert StepSeconds(finetune.path) == {"train the teacher": 4000.0}
    assert StepSeconds(probe.path) == {"MAE pretraining": 70.0}
    earlier = {"MAE pretraining": 1594.0, "student, distillation hard": 600.0}  # a --part run's results file
    assert finetune.with_earlier(earlier) == {"student, distillation hard": 600.0, "train the teacher": 4000.0}

    # a run started over by another script moves the time to that script's file
    pretrain_again = StepSeconds(finetune.path)
    (out / "reconstructions.png").unlink()
    monkeypatch.setattr(fmnist_steps, "recipe_changes", lambda *args, **kwargs: ["mask_ratio"])
    pretrain(pretrain_again)
    assert "train.overwrite=true" in calls[2] and StepSeconds(finetune.path)["MAE pretraining"] == 90.0
    monkeypatch.setattr(fmnist_steps, "recipe_changes", lambda *args, **kwargs: [])
    pretrain(StepSeconds(probe.path))
    assert StepSeconds(probe.path) == {}


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


def test_finetune_benchmark_runs_one_part_and_keeps_the_others_figures(tmp_path, monkeypatch, capsys):
    """`finetune_fmnist.py --part distillation` reruns (b) only: (a)'s figures come from the --json file it updates,
    the summary rows are rebuilt from both; without an earlier file it is one clear error."""
    bench = load_benchmark("finetune_fmnist")
    monkeypatch.setattr(bench, "prepare_shards", lambda *args: None)

    def run(*args):
        monkeypatch.setattr("sys.argv", ["finetune_fmnist.py", "--work-dir", str(tmp_path / "work"), *args])
        bench.main()

    figures = tmp_path / "finetune.json"
    with pytest.raises(SystemExit) as exit_info:
        run("--part", "distillation", "--json", str(figures))
    assert exit_info.value.code == 2 and str(figures) in capsys.readouterr().err.splitlines()[-1]

    def student(top1):
        return {"top1": top1, "top5": 99.0, "best_top1": top1, "best_epoch": 3, "model": "a student",
                "num_train": 54000, "num_samples": 6000, "history": []}

    finetune_part = {"config": "configs/finetune_mae_tiny_fmnist.yaml", "epochs": 6,
                     "runs": {"MAE pretrained": student(88.7), "from scratch": student(79.3)}}
    figures.write_text(json.dumps({"finetune": finetune_part, "distillation": {}, "summary": [],
                                   "seconds": {"finetune from MAE": 8000.0}}))
    new_distillation = {"config": "configs/distill_vit_tiny_fmnist.yaml", "epochs": 3,
                        "training_images_per_epoch": 54000, "teacher": {**student(93.5), "epochs": 10},
                        "runs": {"none": student(72.7), "soft": student(75.6), "hard": student(76.0)}}
    called = []
    monkeypatch.setattr(bench, "finetune_part", lambda *args: called.append("finetune"))
    monkeypatch.setattr(bench, "distillation_part", lambda *args: called.append("distillation") or new_distillation)
    run("--part", "distillation", "--json", str(figures))

    assert called == ["distillation"]
    written = json.loads(figures.read_text())
    assert written["finetune"] == finetune_part and written["distillation"] == new_distillation
    assert written["seconds"] == {"finetune from MAE": 8000.0}  # the kept part's wall time
    rows = {row["row"]: row for row in written["summary"]}
    assert rows["MAE tiny ViT -> finetune"]["value"] == 88.7
    assert rows["DeiT teacher (ResNet-18 from scratch)"]["value"] == 93.5
    assert rows["DeiT student, hard distillation"]["target"] == 72.7 + 1
    assert "(a) finetuning, 6 epoch(s), 54000 training images, 6000 validation images" in capsys.readouterr().out


def test_image_counts_come_from_whichever_run_recorded_them():
    """Rows kept from an older --json file lack the counts; the table's header takes them from a run that has them."""
    runs = {"kept from an older file": {"top1": 78.8}, "run now": {"top1": 80.0, "num_train": 54000,
                                                                   "num_samples": 6000}}
    assert fmnist_steps.image_counts(runs) == "54000 training images, 6000 validation images"
    assert fmnist_steps.image_counts({"old": {"top1": 78.8}}) == "? training images, ? validation images"


def test_a_student_taught_by_a_teacher_retrained_since_starts_over(tmp_path, monkeypatch):
    """A teacher retrained with the same number of epochs saves to the same step folder, so the students' recipe
    (the teacher's path) is unchanged: a student run older than its teacher's weights is run again, not skipped."""
    import os

    from finetune.config import FinetuneConfig
    from pretrain.config import load_config, save_config

    bench = load_benchmark("finetune_fmnist")
    teacher = tmp_path / "teacher_cnn" / "checkpoints" / "step_00004210"
    teacher.mkdir(parents=True)
    out = tmp_path / "distill_hard"
    overrides = [f"distillation.teacher={teacher}", "distillation.kind=hard"]
    save_config(load_config(FinetuneConfig, bench.DISTILL_CONFIG, [f"output_dir={out}", "train.epochs=3", *overrides]),
                out / "config.yaml")
    (out / "metrics.json").write_text(json.dumps({"top1": 75.0, "epochs": 3}))
    calls = []

    def fake_run(step, main, argv):
        calls.append(argv)
        (out / "metrics.json").write_text(json.dumps({"top1": 76.0, "epochs": 3}))
        return 1.0
    monkeypatch.setattr(steps_of(bench), "run", fake_run)
    seconds = fmnist_steps.StepSeconds(tmp_path / "seconds.json")

    def student():
        return bench.finetune("student", bench.DISTILL_CONFIG, out, overrides, 3, seconds, inputs=(teacher,))

    start = (out / "config.yaml").stat().st_mtime
    os.utime(teacher, (start - 60, start - 60))  # the teacher the student learnt from: the run is done
    assert student()["top1"] == 75.0 and calls == []
    os.utime(teacher, (start + 60, start + 60))  # the teacher trained again since
    assert student()["top1"] == 76.0
    assert len(calls) == 1 and "train.overwrite=true" in calls[0] and "train.resume=latest" not in calls[0]


def test_detr_canvases_hold_out_the_items_every_other_benchmark_holds_out(tmp_path, monkeypatch):
    """The held-out canvases are made of the images the 54k/6k split holds out, so that no backbone pretrained or
    finetuned on the training split has seen a held-out item; canvases of an earlier split are written again."""
    import argparse

    import numpy as np

    from data import read_embedded, split_val_indices

    detr = load_benchmark("detr_fmnist")
    drawn_from = {}
    original = detr.write_coco_split

    def recording(name, count, images, labels, out, args, seed):
        drawn_from[name] = images
        return original(name, count, images, labels, out, args, seed)

    monkeypatch.setattr(detr, "write_coco_split", recording)
    args = argparse.Namespace(fashion_mnist=str(tmp_path / "none"), smoke=True, canvas=32, min_item=8, max_item=16,
                              train_images=8, val_images=4)
    description = detr.make_dataset(tmp_path / "work", args)

    images, _, _ = detr.load_items(tmp_path / "none", smoke=True)
    assert len(images) == len(read_embedded()[1])
    held_out = sorted(split_val_indices(len(images), 0.1, 0))
    training = sorted(set(range(len(images))) - set(held_out))
    assert np.array_equal(drawn_from["val"], images[held_out])
    assert np.array_equal(drawn_from["train"], images[training])
    assert description["splits"]["val"]["images"] == 4 and description["splits"]["train"]["images"] == 8

    drawn_from.clear()
    assert detr.make_dataset(tmp_path / "work", args) == description and not drawn_from  # done earlier: kept
    described = tmp_path / "work" / "coco" / "dataset.json"
    described.write_text(json.dumps({**description, "held_out_items": "the last sixth"}))  # an earlier split
    detr.make_dataset(tmp_path / "work", args)
    assert set(drawn_from) == {"train", "val"}


def test_clip_benchmark_starts_its_image_tower_from_the_mae_and_trains_again_for_another_recipe(tmp_path, monkeypatch):
    """A CLIP config whose image tower starts from an MAE gets the benchmarks' MAE (pretrained first); a CLIP run of
    another recipe, or begun before the MAE or the caption shards were last written, is trained again; a finished one
    is kept."""
    import os

    import yaml

    from pretrain.config import CLIPPretrainConfig, load_config, save_config

    clip = load_benchmark("clip_zeroshot")
    work = tmp_path / "work"
    clip_dir = work / "clip"
    mae_weights = work / "mae" / "checkpoints" / "step_00000010"
    mae_weights.mkdir(parents=True)
    pairs_stats = work / "clip_pairs" / "stats.json"  # what `python -m data captions` leaves with the pairs
    pairs_stats.parent.mkdir()
    pairs_stats.write_text("{}")
    pretrained, calls = [], []
    monkeypatch.setattr(clip, "pretrain", lambda step, config, out, overrides, seconds: pretrained.append(out))
    monkeypatch.setattr(clip, "pretrained_weights", lambda out: mae_weights)

    def fake_run(step, main, argv):  # what a finished CLIP run leaves: its config and its open_clip export
        calls.append(argv)
        clip_dir.mkdir(parents=True, exist_ok=True)
        save_config(load_config(CLIPPretrainConfig, argv[1], argv[2:]), clip_dir / "config.yaml")
        export = clip_dir / "open_clip" / "open_clip_model.safetensors"
        export.parent.mkdir(exist_ok=True)
        export.write_bytes(b"")
        return 1.0
    monkeypatch.setattr(steps_of(clip), "run", fake_run)
    seconds = fmnist_steps.StepSeconds(tmp_path / "seconds.json")
    recipe = yaml.safe_load(clip.CLIP_CONFIG.read_text())
    recipe["model"].pop("image_tower_checkpoint", None)
    random_init = tmp_path / "clip_random_init.yaml"
    random_init.write_text(yaml.safe_dump(recipe))
    recipe["model"]["image_tower_checkpoint"] = "runs/bench_fmnist/mae"
    from_mae = tmp_path / "clip_from_mae.yaml"
    from_mae.write_text(yaml.safe_dump(recipe))

    clip.train_clip(work, clip_dir, None, seconds, config=random_init)
    assert len(calls) == 1 and not pretrained and not any("image_tower_checkpoint" in arg for arg in calls[0])
    clip.train_clip(work, clip_dir, None, seconds, config=random_init)
    assert len(calls) == 1  # done earlier: kept
    clip.train_clip(work, clip_dir, None, seconds, config=from_mae)
    assert pretrained == [work / "mae"] and len(calls) == 2
    assert f"model.image_tower_checkpoint={work / 'mae'}" in calls[1] and "train.overwrite=true" in calls[1]
    clip.train_clip(work, clip_dir, None, seconds, config=from_mae)
    assert len(calls) == 2
    later = (clip_dir / "config.yaml").stat().st_mtime + 60
    os.utime(mae_weights, (later, later))  # the MAE pretrained again since
    clip.train_clip(work, clip_dir, None, seconds, config=from_mae)
    assert len(calls) == 3 and "train.overwrite=true" in calls[2]
    later = (clip_dir / "config.yaml").stat().st_mtime + 60
    os.utime(pairs_stats, (later, later))  # the captions written again since (another caption recipe)
    clip.train_clip(work, clip_dir, None, seconds, config=from_mae)
    assert len(calls) == 4 and "train.overwrite=true" in calls[3]


def test_detr_benchmark_trains_again_for_another_recipe_or_a_newer_backbone_and_resumes_an_interrupted_run(
        tmp_path, monkeypatch):
    """benchmarks/detr_fmnist.py's DETR step: a finished run is kept; another recipe (an override) or a backbone
    written since the run began (the finetune run again) starts over; an interrupted run resumes."""
    import os

    from finetune.config import DetrConfig
    from pretrain.config import load_config, save_config

    detr = load_benchmark("detr_fmnist")
    work = tmp_path / "work"
    out = work / "detr"
    backbone = tmp_path / "finetune_mae" / "last"
    backbone.mkdir(parents=True)
    (backbone / "model.safetensors").write_bytes(b"")
    calls = []

    def fake_run(step, main, argv):  # what a finished DETR run leaves: its config and metrics.json
        calls.append(argv)
        cfg = load_config(DetrConfig, argv[1], argv[2:])
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
        (out / "metrics.json").write_text(json.dumps({"epochs": cfg.train.epochs}))
        return 1.0
    monkeypatch.setattr(steps_of(detr), "run", fake_run)
    seconds = fmnist_steps.StepSeconds(tmp_path / "seconds.json")

    detr.train_detr(work, backbone, seconds, [])
    assert len(calls) == 1 and "train.overwrite=true" in calls[0] and f"encoder.checkpoint={backbone}" in calls[0]
    detr.train_detr(work, backbone, seconds, [])
    assert len(calls) == 1  # done earlier: kept
    detr.train_detr(work, backbone, seconds, ["lr_drop=5"])
    assert len(calls) == 2 and "train.overwrite=true" in calls[1]  # another recipe
    detr.train_detr(work, backbone, seconds, ["lr_drop=5"])
    assert len(calls) == 2
    later = (out / "config.yaml").stat().st_mtime + 60
    os.utime(backbone / "model.safetensors", (later, later))  # the backbone finetuned again since
    detr.train_detr(work, backbone, seconds, ["lr_drop=5"])
    assert len(calls) == 3 and "train.overwrite=true" in calls[2]
    os.utime(out / "config.yaml", (later + 60, later + 60))  # that run began after the backbone was written

    (out / "metrics.json").write_text(json.dumps({"epochs": 2}))  # stopped after 2 epochs, a checkpoint kept
    (out / "checkpoints" / "step_00000500").mkdir(parents=True)
    monkeypatch.setattr(steps_of(detr), "find_latest", lambda root: root / "step_00000500" if root == out / "checkpoints" else None)
    detr.train_detr(work, backbone, seconds, ["lr_drop=5"])
    assert len(calls) == 4 and "train.resume=latest" in calls[3]
