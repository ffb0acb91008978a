"""Zero-shot's single templates against their ensemble: each template's own top-1 measured in the same pass over the
images, in one and two processes, through the task; the Fashion-MNIST templates file."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from clip_helpers import train_tiny_clip, write_tiny_clip_config
from finetune.cli import main as finetune_main

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = ["a photo of a {}.", "a grey photo of the {}.", "itap of my {}."]
COMPARISON_KEYS = {"per_template_top1", "mean_single_template_top1", "best_single_template_top1",
                   "ensemble_minus_mean_single"}


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, tiny_pair_shards, single_thread) -> Path:
    config = write_tiny_clip_config(tmp_path_factory.mktemp("clip_config"))
    return train_tiny_clip(tmp_path_factory.mktemp("clip_run") / "run", config, tiny_pair_shards)


def zero_shot_argv(out: Path, checkpoint, *overrides: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "zeroshot_clip_tiny_demo.yaml"), f"output_dir={out}",
            f"model.checkpoint={checkpoint}", "data.image_size=16", "data.num_workers=0", "train.batch_size=8",
            "train.mixed_precision=no", "logging.progress_bar=false", *overrides]


def single_template_top1_by_hand(model, tokenizer, names: list[str], shards: Path, transform) -> list[float]:
    """Every image embedded in shard order, then per template the argmax accuracy of its prompts' normalised
    embeddings as the class weights (percent)."""
    from data import ShardStream

    features, labels = [], []
    with torch.no_grad():
        for batch in ShardStream(str(shards), transform, 8, train=False):
            features.append(model.encode_image(batch["image"], normalize=True))
            labels.append(batch["label"])
        features, labels = torch.cat(features), torch.cat(labels)
        accuracies = []
        for template in TEMPLATES:
            weights = F.normalize(model.encode_text(tokenizer([template.format(name) for name in names])), dim=-1)
            accuracies.append(100.0 * float(((features @ weights.T).argmax(dim=1) == labels).double().mean()))
    return accuracies


def assert_comparison_consistent(metrics: dict, templates: list[str]) -> None:
    singles = [entry["top1"] for entry in metrics["per_template_top1"]]
    assert [entry["template"] for entry in metrics["per_template_top1"]] == templates
    assert metrics["mean_single_template_top1"] == pytest.approx(sum(singles) / len(singles))
    assert metrics["best_single_template_top1"] == max(singles)
    assert metrics["ensemble_minus_mean_single"] == pytest.approx(metrics["top1"] - metrics["mean_single_template_top1"])


def test_each_templates_top1_equals_its_classifier_by_hand_and_the_ensemble_is_unchanged(
        clip_run, tiny_shards, single_thread):
    from accelerate import Accelerator

    from data import clip_eval_transform
    from pretrain.clip_eval import (class_names, ensemble_of_single_templates, ensemble_vs_single_templates,
                                    evaluate_zero_shot, single_template_weights, zero_shot_weights)
    from pretrain.models.clip import load_clip, tokenizer_for

    model, name = load_clip(clip_run)
    model.eval()
    tokenizer, shards, transform = tokenizer_for(name), tiny_shards[1], clip_eval_transform(16)
    names = class_names("stats", str(shards))
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    classifier = zero_shot_weights(model, tokenizer, names, TEMPLATES, "cpu")
    evaluate = dict(shards=str(shards), transform=transform, batch_size=8, num_workers=0, accelerator=accelerator,
                    progress=False)
    metrics = evaluate_zero_shot(model, classifier, template_classifiers=single_template_weights(
        model, tokenizer, names, TEMPLATES, "cpu"), **evaluate)
    ensemble_alone = evaluate_zero_shot(model, classifier, **evaluate)

    single_top1 = metrics.pop("single_template_top1")
    assert metrics == ensemble_alone  # the ensemble's figures do not move
    # the ensemble from the single templates' classifiers (how `python -m finetune` builds it, encoding each prompt
    # once) is open_clip's
    torch.testing.assert_close(ensemble_of_single_templates(single_template_weights(
        model, tokenizer, names, TEMPLATES, "cpu")), classifier, rtol=0, atol=1e-6)
    assert single_top1 == pytest.approx(single_template_top1_by_hand(model, tokenizer, names, shards, transform),
                                        abs=1e-6)
    comparison = ensemble_vs_single_templates(TEMPLATES, single_top1, metrics["top1"])
    assert set(comparison) == COMPARISON_KEYS
    assert_comparison_consistent({**comparison, "top1": metrics["top1"]}, TEMPLATES)


@pytest.fixture(scope="module")
def two_template_run(clip_run, tiny_shards, tmp_path_factory) -> tuple[Path, dict]:
    templates = tmp_path_factory.mktemp("templates") / "two.txt"
    templates.write_text("# two prompts\na photo of a {}.\na grey photo of the {}.\n")
    out = tmp_path_factory.mktemp("zeroshot") / "two"
    argv = zero_shot_argv(out, clip_run, f"data.val={tiny_shards[1]}", f"templates={templates}")
    assert finetune_main(argv) == 0
    return templates, json.loads((out / "metrics.json").read_text())


def test_the_task_writes_each_templates_top1_and_logs_the_ensembles_gain(two_template_run, clip_run, tiny_shards,
                                                                          tmp_path, caplog, single_thread):
    _, metrics = two_template_run
    assert COMPARISON_KEYS <= metrics.keys() and metrics["num_templates"] == 2 and metrics["num_samples"] == 16
    assert_comparison_consistent(metrics, ["a photo of a {}.", "a grey photo of the {}."])
    assert all(0 <= entry["top1"] <= 100 for entry in metrics["per_template_top1"])

    with caplog.at_level(logging.INFO, logger="finetune.zeroshot"):
        assert finetune_main(zero_shot_argv(tmp_path / "one", clip_run, f"data.val={tiny_shards[1]}",
                                            "templates=a photo of a {}.")) == 0
    one = json.loads((tmp_path / "one" / "metrics.json").read_text())
    assert one["num_templates"] == 1 and not COMPARISON_KEYS & one.keys()  # nothing to compare with
    assert [entry["top1"] for entry in metrics["per_template_top1"]][0] == pytest.approx(one["top1"], abs=1e-6)
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("zero-shot (")]
    assert summary and "single template" not in summary[-1]


def test_each_set_compares_its_own_templates(clip_run, tiny_shards, tmp_path, caplog, single_thread):
    sets = [{"name": "fashion", "shards": str(tiny_shards[1]), "templates": str(REPO / "configs" /
                                                                                "fashion_mnist_templates.txt")},
            {"name": "one-prompt", "shards": str(tiny_shards[1]), "templates": "a photo of a {}."}]
    with caplog.at_level(logging.INFO, logger="finetune.zeroshot"):
        assert finetune_main(zero_shot_argv(tmp_path / "sets", clip_run, f"sets={json.dumps(sets)}")) == 0
    rows = json.loads((tmp_path / "sets" / "metrics.json").read_text())["sets"]
    from pretrain.clip_eval import prompt_templates

    assert_comparison_consistent(rows["fashion"], prompt_templates(sets[0]["templates"]))
    assert not COMPARISON_KEYS & rows["one-prompt"].keys()
    summary = [r.getMessage() for r in caplog.records if r.getMessage().startswith("zero-shot (")][-1]
    gain = rows["fashion"]["ensemble_minus_mean_single"]
    assert f"fashion {rows['fashion']['top1']:.2f}% (ensemble {gain:+.2f} points vs the mean single template" in summary


def test_two_processes_count_each_templates_top1_as_one(two_template_run, clip_run, tiny_shards, tmp_path):
    """Each process scores its share of the images; the summed counts give the one process's figures."""
    templates, one_process = two_template_run
    out = tmp_path / "two_processes"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "finetune", *zero_shot_argv(out, clip_run, f"data.val={tiny_shards[1]}",
                                                               f"templates={templates}")],
                            cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_samples"] == 16
    for key in ("top1", "mean_single_template_top1", "best_single_template_top1", "ensemble_minus_mean_single"):
        assert metrics[key] == pytest.approx(one_process[key], abs=1e-6), key
    assert [entry["template"] for entry in metrics["per_template_top1"]] == [
        entry["template"] for entry in one_process["per_template_top1"]]
    assert [entry["top1"] for entry in metrics["per_template_top1"]] == pytest.approx(
        [entry["top1"] for entry in one_process["per_template_top1"]], abs=1e-6)


def test_the_fashion_mnist_templates_file_holds_unseen_photo_prompts_with_one_slot_each():
    from data.captions import CAPTION_PHRASINGS, PHRASINGS_WITHOUT_ATTRIBUTES
    from pretrain.clip_eval import prompt_templates

    path = REPO / "configs" / "fashion_mnist_templates.txt"
    templates = prompt_templates(str(path))
    assert 8 <= len(templates) <= 12 and len(set(templates)) == len(templates)
    assert all(template.count("{}") == 1 for template in templates)
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    assert lines[0].startswith("#") and lines[1:] == templates  # one header comment, then a template a line
    # the "photo of" family, which no training caption uses: the prompts stay unseen
    assert all("photo" in template for template in templates)
    assert not any("photo" in phrasing for phrasing in CAPTION_PHRASINGS + PHRASINGS_WITHOUT_ATTRIBUTES)
