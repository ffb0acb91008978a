"""Monitoring during pretraining (pretrain/monitor.py, the `eval` section) through `python -m pretrain`: k-NN for
MAE / UM-MAE / SimMIM, zero-shot and retrieval for CLIP, in log.jsonl, metrics.json and the curves picture; the
k-NN monitor gives the `knn` task's numbers; a resumed run keeps the history; mistakes stop the run at start-up."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from clip_helpers import write_tiny_clip_config
from finetune.cli import main as finetune_main
from pretrain.cli import main
from pretrain.visualize import save_loss_curve

pytestmark = pytest.mark.usefixtures("single_thread")

KNN_KEYS = ("eval/knn_top1", "eval/knn_top5")


def train(argv: list[str]) -> None:
    """One run through the entry point; accelerate's process-wide state reset afterwards (as fresh_accelerate_state
    does), for runs made in module fixtures."""
    from accelerate.state import AcceleratorState, GradientState

    assert main(argv) == 0
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def mae_argv(out: Path, shards, model: str, *overrides: str) -> list[str]:
    """A micro MAE on the 64 tiny training images, batch 8 (8 steps an epoch), 2 epochs, k-NN every epoch: the 16
    validation images against a bank of all 64 training images."""
    train_dir, val_dir = shards
    return [f"model.name={model}", f"data.train={train_dir}", f"data.val={val_dir}", "data.image_size=16",
            "data.num_workers=0", "data.shuffle_buffer=16", "train.batch_size=8", "train.epochs=2",
            "train.mixed_precision=no", "logging.wandb=disabled", "logging.progress_bar=false", "num_pictures=4",
            "eval.every_epochs=1", f"output_dir={out}", *overrides]


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def metrics_of(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory, tiny_shards, micro_model, single_thread) -> Path:
    out = tmp_path_factory.mktemp("monitor") / "mae"
    train(mae_argv(out, tiny_shards, micro_model))
    return out


# ------------------------------------------------------------------------------------------------ MAE family

def test_knn_is_logged_every_epoch_to_the_log_metrics_and_curves(mae_run):
    log = read_log(mae_run)
    assert all("loss" in record for record in log)  # readers of log[-1]["loss"] keep working
    evaluated = [record for record in log if "eval/knn_top1" in record]
    assert [record["step"] for record in evaluated] == [8, 16] and log[-1] is evaluated[-1]
    for record in evaluated:
        assert 0 <= record["eval/knn_top1"] <= record["eval/knn_top5"] <= 100
        assert not any(key.startswith("eval/num_") for key in record)  # counts stay in metrics.json

    metrics = metrics_of(mae_run)
    assert [(h["epoch"], h["step"]) for h in metrics["history"]] == [(1, 8), (2, 16)]
    assert [h["knn_top1"] for h in metrics["history"]] == [record["eval/knn_top1"] for record in evaluated]
    assert metrics["num_knn_images"] == 16 and metrics["num_knn_bank"] == 64 and metrics["num_classes"] == 10
    assert metrics["best_knn_top1"] == max(h["knn_top1"] for h in metrics["history"])
    assert not (mae_run / "best").exists() and not (mae_run / "last").exists()  # the checkpoints hold the weights

    with Image.open(mae_run / "loss_curve.png") as picture:
        assert picture.format == "PNG" and picture.height == 700  # a second panel: the evaluations


def test_the_knn_monitor_gives_the_knn_tasks_numbers_on_the_same_images(mae_run, tiny_shards, tmp_path):
    """The last evaluation (step 16) measured the weights of the run's last checkpoint: the `knn` task on that
    checkpoint, with the same k, temperature and images, reports the same accuracies."""
    train_dir, val_dir = tiny_shards
    out = tmp_path / "knn"
    assert finetune_main(["task=knn", f"encoder.checkpoint={mae_run}", f"data.train={train_dir}",
                          f"data.val={val_dir}", "data.image_size=16", "data.num_workers=0", "train.batch_size=8",
                          "train.mixed_precision=no", "logging.progress_bar=false", "k=[20]", "temperature=0.07",
                          f"output_dir={out}"]) == 0
    task, monitored = metrics_of(out), metrics_of(mae_run)
    assert task["k"]["20"] == {"top1": monitored["knn_top1"], "top5": monitored["knn_top5"]}
    assert (task["num_test"], task["num_train"]) == (monitored["num_knn_images"], monitored["num_knn_bank"])


def test_a_resumed_run_keeps_the_evaluation_history(mae_run, tiny_shards, micro_model, tmp_path):
    """Stopped after epoch 1 and resumed: the history of metrics.json goes on from the first run's evaluation, and
    equals the uninterrupted run's (resume is exact)."""
    out = tmp_path / "resumed"
    train(mae_argv(out, tiny_shards, micro_model, "train.stop_after_steps=8"))
    assert [h["step"] for h in metrics_of(out)["history"]] == [8]
    train(mae_argv(out, tiny_shards, micro_model, "train.resume=latest"))
    assert metrics_of(out)["history"] == metrics_of(mae_run)["history"]
    assert [r["step"] for r in read_log(out) if "eval/knn_top1" in r] == [8, 16]


def test_every_steps_evaluates_every_few_steps_and_after_the_last(tiny_shards, micro_model, tmp_path):
    out = tmp_path / "steps"
    assert main(mae_argv(out, tiny_shards, micro_model, "train.epochs=1", "eval.every_epochs=0",
                         "eval.every_steps=3", "eval.max_images=10", "eval.max_bank_images=30")) == 0
    assert [r["step"] for r in read_log(out) if set(KNN_KEYS) <= r.keys()] == [3, 6, 8]
    metrics = metrics_of(out)
    assert [h["epoch"] for h in metrics["history"]] == [0.375, 0.75, 1]
    assert (metrics["num_knn_images"], metrics["num_knn_bank"]) == (10, 30)  # bounded sets


UM_TINY, SIMMIM_TINY = "ummae_swin_tiny_cpu", "simmim_swin_tiny_cpu"


@pytest.mark.parametrize("kind, overrides", [
    ("micro", []),
    (UM_TINY, ["data.image_size=32"]),
    (SIMMIM_TINY, ["data.image_size=32", "model.mask_ratio=0.6", "model.norm_pix_loss=false"]),
])
def test_every_model_kind_draws_its_reconstructions_and_is_monitored(kind, overrides, tiny_shards, micro_model,
                                                                     tmp_path):
    """MAE's ViT, UM-MAE's and SimMIM's Swin: the reconstruction grid of evaluation images, and k-NN on the encoder
    (a Swin's average-pooled last stage) after the last step."""
    out = tmp_path / "run"
    model = micro_model if kind == "micro" else kind
    assert main(mae_argv(out, tiny_shards, model, "train.stop_after_steps=2", *overrides)) == 0
    with Image.open(out / "reconstructions.png") as picture:
        assert picture.format == "PNG" and picture.width > 100
    assert read_log(out)[-1]["step"] == 2 and 0 <= read_log(out)[-1]["eval/knn_top1"] <= 100


@pytest.mark.parametrize("overrides, line", [
    (["data.val=null"], "error: 'eval.shards' (or 'data.val') must name the labelled images k-NN monitoring "
                        "classifies (eval.every_epochs / eval.every_steps is set)"),
    (["eval.every_steps=4"], "error: 'eval.every_epochs' and 'eval.every_steps' are alternatives: set one of "
                             "them, the other to 0 / null"),
    (["eval.k=100"], "error: 'eval.k' 100 exceeds the 64 bank images of {train}: choose k <= 64"),
    (["eval.bank={pairs}"], "error: 'eval.bank' {pairs}: the k-NN bank must be labelled shards ({pairs} holds "
                            "image-text shards"),
])
def test_monitoring_mistakes_are_one_line_errors_before_training(overrides, line, tiny_shards, tiny_pair_shards,
                                                                 micro_model, tmp_path, capsys):
    """Each stops the run before training, with one line naming the key (the whole line, or how it starts)."""
    names = {"train": tiny_shards[0], "pairs": tiny_pair_shards}
    out = tmp_path / "run"
    assert main(mae_argv(out, tiny_shards, micro_model, *[o.format(**names) for o in overrides])) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(line.format(**names))
    assert not (out / "log.jsonl").exists()


# ------------------------------------------------------------------------------------------------ CLIP

@pytest.mark.parametrize("val, zero_shot, measured", [
    ("pairs", True, ("zeroshot", "retrieval")),
    ("pairs", False, ("retrieval",)),
    ("labelled", False, ("zeroshot",)),  # a labelled data.val (as "embedded" is) serves zero-shot
])
def test_clip_monitoring_logs_zero_shot_and_retrieval(val, zero_shot, measured, tiny_pair_shards, tiny_shards,
                                                      tmp_path):
    """Zero-shot top-1 on labelled shards and R@1 both ways among at most eval.max_images pairs of data.val;
    metrics.json's best is zero-shot top-1, else image->text R@1."""
    out = tmp_path / "clip"
    argv = ["objective=clip", f"model.open_clip_config={write_tiny_clip_config(tmp_path)}",
            f"data.train={tiny_pair_shards}", f"data.val={tiny_pair_shards if val == 'pairs' else tiny_shards[1]}",
            "data.image_size=16", "data.num_workers=0", "data.shuffle_buffer=16", "train.batch_size=16",
            "train.epochs=1", "train.mixed_precision=no", "logging.wandb=disabled", "logging.progress_bar=false",
            "eval.every_epochs=1", "eval.max_images=24", f"output_dir={out}"]
    if zero_shot:
        argv.append(f"eval.zeroshot_shards={tiny_shards[1]}")
    assert main(argv) == 0
    last = read_log(out)[-1]
    assert last["step"] == 4 and last["loss"] > 0
    keys = {"zeroshot": {"eval/zeroshot_top1", "eval/zeroshot_top5"},
            "retrieval": {"eval/image_to_text_R@1", "eval/text_to_image_R@1"}}
    assert {k for k in last if k.startswith("eval/")} == set().union(*(keys[m] for m in measured))
    assert all(0 <= last[k] <= 100 for k in last if k.startswith("eval/"))
    metrics = metrics_of(out)
    if "retrieval" in measured:
        assert metrics["num_retrieval_pairs"] == 24
    if "zeroshot" in measured:
        assert metrics["num_zeroshot_images"] == 16 and metrics["best_zeroshot_top1"] == last["eval/zeroshot_top1"]
    else:
        assert metrics["best_image_to_text_R@1"] == last["eval/image_to_text_R@1"]
    assert (out / "loss_curve.png").is_file()


def test_clip_monitoring_without_anything_to_evaluate_is_a_config_error(tmp_path, capsys):
    assert main(["objective=clip", "data.val=null", "eval.every_epochs=1", f"output_dir={tmp_path / 'x'}"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: 'eval.zeroshot_shards' (labelled) or 'eval.shards' / 'data.val' (image-text pairs) must name what "
        "CLIP monitoring evaluates (eval.every_epochs / eval.every_steps is set)")


# ------------------------------------------------------------------------------------------------ the picture

def test_the_curves_picture_adds_an_evaluation_panel_only_when_the_log_has_evaluations(tmp_path):
    records = [{"step": s, "loss": 1.0 / s, "lr": 1e-3} for s in range(1, 11)]
    plain, monitored = tmp_path / "plain.jsonl", tmp_path / "monitored.jsonl"
    plain.write_text("".join(json.dumps(r) + "\n" for r in records))
    monitored.write_text("".join(json.dumps({**r, **({"eval/knn_top1": 10.0 * r["step"]} if r["step"] % 5 == 0
                                                      else {})}) + "\n" for r in records))
    for log in (plain, monitored):
        save_loss_curve(log, log.with_suffix(".png"))
    with Image.open(plain.with_suffix(".png")) as one, Image.open(monitored.with_suffix(".png")) as two:
        assert one.size == (600, 400) and two.size == (600, 700)
