"""CLIP's image-text retrieval (recall@k against open_clip's definition, the `retrieval` task) and zero-shot over
several labelled sets in one run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from clip_helpers import train_tiny_clip, write_tiny_clip_config
from finetune.cli import main as finetune_main
from pretrain.clip_eval import recall_at_k

REPO = Path(__file__).resolve().parents[1]
KEYS = [f"{direction}_{what}" for direction in ("image_to_text", "text_to_image")
        for what in ("R@1", "R@5", "R@10", "mean_rank", "median_rank")]


def argsort_metrics(similarity: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """open_clip's get_clip_metrics on a similarity matrix, written out: sort every row, find the partner's place
    (recall in percent here)."""
    metrics = {}
    for name, matrix in (("image_to_text", similarity), ("text_to_image", similarity.T)):
        ranking = torch.argsort(matrix, dim=1, descending=True)
        ranks = torch.where(ranking == torch.arange(len(matrix)).view(-1, 1))[1].numpy()
        metrics[f"{name}_mean_rank"] = ranks.mean() + 1
        metrics[f"{name}_median_rank"] = np.floor(np.median(ranks)) + 1
        for k in ks:
            metrics[f"{name}_R@{k}"] = 100.0 * np.mean(ranks < k)
    return metrics


# ------------------------------------------------------------------------------------------------ recall@k


def test_recall_at_k_by_hand_in_both_directions():
    similarity = torch.tensor([[0.9, 0.1, 0.2],
                               [0.8, 0.5, 0.1],  # image 1: text 0 scores above its own
                               [0.3, 0.7, 0.6]])  # image 2: text 1 scores above its own
    metrics = recall_at_k(similarity, ks=(1, 2))
    # image->text ranks 1, 2, 2; text->image (columns): text 1 finds image 2 first, ranks 1, 2, 1
    assert metrics["image_to_text_R@1"] == pytest.approx(100 / 3)
    assert metrics["image_to_text_R@2"] == 100.0
    assert metrics["image_to_text_mean_rank"] == pytest.approx(5 / 3)
    assert metrics["image_to_text_median_rank"] == 2
    assert metrics["text_to_image_R@1"] == pytest.approx(200 / 3)
    assert metrics["text_to_image_mean_rank"] == pytest.approx(4 / 3)
    assert metrics["text_to_image_median_rank"] == 1
    assert metrics == pytest.approx(argsort_metrics(similarity, ks=(1, 2)))
    swapped = recall_at_k(similarity.T, ks=(1, 2))  # texts as queries: the directions trade places
    assert swapped["image_to_text_R@1"] == metrics["text_to_image_R@1"]


def test_median_rank_of_an_even_count_is_numpys_floored_as_open_clip():
    similarity = torch.tensor([[1.0, 0, 0, 0],
                               [0, 1, 0, 0],
                               [2, 3, 1, 0],  # two texts above the partner: rank 3
                               [2, 3, 0, 1]])
    metrics = recall_at_k(similarity)
    # ranks 1, 1, 3, 3: numpy's median 2 (torch.median would say 1)
    assert metrics["image_to_text_median_rank"] == 2 and metrics["image_to_text_mean_rank"] == 2
    assert metrics == pytest.approx(argsort_metrics(similarity))


@pytest.mark.parametrize("n", [1, 4, 7, 30])
def test_recall_at_k_equals_the_argsort_definition_and_rises_with_k(n):
    generator = torch.Generator().manual_seed(n)
    similarity = torch.randn(n, n, generator=generator) + 2 * torch.eye(n)  # continuous: no ties
    metrics = recall_at_k(similarity, ks=(1, 2, 5, 10, 50), chunk_size=3)  # chunks of rows, as for large N
    assert metrics == pytest.approx(argsort_metrics(similarity, ks=(1, 2, 5, 10, 50)))
    for direction in ("image_to_text", "text_to_image"):
        recalls = [metrics[f"{direction}_R@{k}"] for k in (1, 2, 5, 10, 50)]
        assert recalls == sorted(recalls) and recalls[-1] == 100.0


def test_recall_at_k_equals_open_clip_train_on_features():
    train = pytest.importorskip("open_clip_train.train")
    generator = torch.Generator().manual_seed(0)
    images = torch.nn.functional.normalize(torch.randn(40, 8, generator=generator), dim=1)
    texts = torch.nn.functional.normalize(images + 0.8 * torch.randn(40, 8, generator=generator), dim=1)
    theirs = train.get_clip_metrics(images, texts, logit_scale=torch.tensor(100.0))
    ours = recall_at_k(images @ texts.T)
    for key in KEYS:
        expected = theirs[key] * (100 if "R@" in key else 1)
        assert ours[key] == pytest.approx(float(expected)), key


def test_ties_count_in_the_partners_favour():
    """A candidate scoring exactly as the partner does not push it down, whatever order a sort would give."""
    metrics = recall_at_k(torch.ones(5, 5))
    assert all(metrics[f"{d}_R@1"] == 100.0 and metrics[f"{d}_median_rank"] == 1
               for d in ("image_to_text", "text_to_image"))
    similarity = torch.tensor([[0.5, 0.5, 0.9],  # image 0: one text above, one tied: rank 2
                               [0.1, 0.2, 0.2],  # image 1: tied with text 2: rank 1
                               [0.0, 0.0, 0.0]])  # image 2: all tied: rank 1
    metrics = recall_at_k(similarity, ks=(1,))
    assert metrics["image_to_text_R@1"] == pytest.approx(200 / 3)
    assert metrics["image_to_text_mean_rank"] == pytest.approx(4 / 3)


def test_recall_at_k_refuses_a_matrix_that_is_not_square():
    with pytest.raises(ValueError, match="square"):
        recall_at_k(torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------------ the task


@pytest.fixture(scope="module")
def tiny_clip_config(tmp_path_factory) -> Path:
    return write_tiny_clip_config(tmp_path_factory.mktemp("clip_config"))


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory, tiny_pair_shards, tiny_clip_config, single_thread) -> Path:
    return train_tiny_clip(tmp_path_factory.mktemp("clip_run") / "run", tiny_clip_config, tiny_pair_shards)


def retrieval_argv(out: Path, checkpoint, pairs, *overrides: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "retrieval_clip_tiny_demo.yaml"), f"output_dir={out}",
            f"model.checkpoint={checkpoint}", f"data.val={pairs}", "data.image_size=16", "data.num_workers=0",
            "train.batch_size=16", "train.mixed_precision=no", "logging.progress_bar=false", *overrides]


def recall_by_hand(model, name: str, pairs: Path, count: int | None = None, ours: bool = True) -> dict[str, float]:
    """The first `count` pairs' normalised features in shard order (batches of the task's 16, so the features are
    bit for bit the task's: identical captions give exactly tied candidates), then recall@k of their similarities.
    The images normalised as the task does: with the statistics our run trained with (its weights record them, the
    CLIP demo's Fashion-MNIST ones), else (`ours` False: weights of other origins) OpenAI's."""
    from data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, ShardStream, clip_eval_transform
    from open_clip import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    from pretrain.models.clip import tokenizer_for

    mean, std = (FASHION_MNIST_MEAN, FASHION_MNIST_STD) if ours else (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD)
    transform = clip_eval_transform(16, mean=mean, std=std)
    stream = ShardStream(str(pairs), transform, 16, train=False, kind="image-text", tokenizer=tokenizer_for(name))
    images, texts = [], []
    with torch.no_grad():
        for batch in stream:
            images.append(model.encode_image(batch["image"], normalize=True))
            texts.append(model.encode_text(batch["text"], normalize=True))
    images, texts = torch.cat(images)[:count], torch.cat(texts)[:count]
    return recall_at_k(images @ texts.T)


@pytest.fixture(scope="module")
def one_process_retrieval(clip_run, tiny_pair_shards, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("retrieval") / "out"
    assert finetune_main(retrieval_argv(out, clip_run, tiny_pair_shards)) == 0
    return json.loads((out / "metrics.json").read_text())


def test_retrieval_task_writes_the_recalls_of_our_clip_run(one_process_retrieval, clip_run, tiny_pair_shards,
                                                           tiny_clip_config):
    from pretrain.models.clip import load_clip

    metrics = one_process_retrieval
    assert set(KEYS) <= metrics.keys() and metrics["num_pairs"] == 64
    assert metrics["model"] == str(clip_run) and metrics["open_clip_config"] == tiny_clip_config.stem
    assert metrics["eval_shards"] == str(tiny_pair_shards) and metrics["config"]["task"] == "retrieval"
    model, name = load_clip(clip_run)
    expected = recall_by_hand(model, name, tiny_pair_shards)
    assert {key: metrics[key] for key in KEYS} == pytest.approx(expected, abs=1e-6)


def test_retrieval_max_samples_is_the_first_pairs_and_the_whole_pool(clip_run, tiny_pair_shards, tmp_path,
                                                                     single_thread):
    from pretrain.models.clip import load_clip

    out = tmp_path / "retrieval"
    assert finetune_main(retrieval_argv(out, clip_run, tiny_pair_shards, "max_samples=10")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_pairs"] == 10 and metrics["config"]["max_samples"] == 10
    model, name = load_clip(clip_run)
    assert {key: metrics[key] for key in KEYS} == pytest.approx(recall_by_hand(model, name, tiny_pair_shards, 10),
                                                                abs=1e-6)


def test_retrieval_of_any_open_clip_model_from_its_config_and_a_local_weights_file(tiny_clip_config, tiny_pair_shards,
                                                                                   tmp_path, single_thread):
    from pretrain.models.clip import create_clip

    torch.manual_seed(1)
    model, name, _ = create_clip(str(tiny_clip_config))
    weights = tmp_path / "random_init.pt"
    torch.save(model.state_dict(), weights)
    out = tmp_path / "retrieval"
    assert finetune_main(retrieval_argv(out, weights, tiny_pair_shards, f"model.open_clip_config={tiny_clip_config}",
                                        "max_samples=20")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["open_clip_config"] == name and metrics["num_pairs"] == 20
    assert {key: metrics[key] for key in KEYS} == pytest.approx(recall_by_hand(model.eval(), name, tiny_pair_shards,
                                                                               20, ours=False), abs=1e-6)


def test_retrieval_refuses_labelled_shards_in_one_line(clip_run, tiny_shards, tmp_path, capsys, single_thread):
    assert finetune_main(retrieval_argv(tmp_path / "a", clip_run, "embedded")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: 'data.val' must name image-text shards (python -m data captions|pairs); the embedded validation "
        "split is labelled")
    assert finetune_main(retrieval_argv(tmp_path / "b", clip_run, tiny_shards[1])) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(tiny_shards[1]) in last


def test_two_process_retrieval_equals_one_process(one_process_retrieval, clip_run, tiny_pair_shards, tmp_path):
    """Each process embeds its share of the pairs; the gathered pool, and so every figure, is the one process's."""
    out = tmp_path / "retrieval2"
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "finetune", *retrieval_argv(out, clip_run, tiny_pair_shards)], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_pairs"] == 64
    assert {key: metrics[key] for key in KEYS} == pytest.approx({key: one_process_retrieval[key] for key in KEYS},
                                                                abs=1e-6)


# ------------------------------------------------------------------------------------------------ zero-shot sets


def zero_shot_argv(out: Path, checkpoint, *overrides: str) -> list[str]:
    return ["--config", str(REPO / "configs" / "zeroshot_clip_tiny_demo.yaml"), f"output_dir={out}",
            f"model.checkpoint={checkpoint}", "data.image_size=16", "data.num_workers=0", "templates=simple",
            "train.mixed_precision=no", *overrides]


def test_zero_shot_over_two_sets_writes_a_row_per_set_their_mean_and_confusion_matrices(clip_run, tiny_shards,
                                                                                          tmp_path, single_thread):
    templates = tmp_path / "templates.txt"
    templates.write_text("a photo of a {}.\na blurry photo of the {}.\n")
    sets = [{"name": "fashion", "shards": str(tiny_shards[1])},
            {"name": "fashion-2-prompts", "shards": str(tiny_shards[1]), "templates": str(templates)}]
    out = tmp_path / "zeroshot"
    assert finetune_main(zero_shot_argv(out, clip_run, f"sets={json.dumps(sets)}")) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    rows = metrics["sets"]
    assert list(rows) == ["fashion", "fashion-2-prompts"]
    assert [rows[name]["num_templates"] for name in rows] == [7, 2]  # the top-level templates, then the set's own
    for row in rows.values():
        assert row["num_samples"] == 16 and row["num_classes"] == 10 and row["eval_shards"] == str(tiny_shards[1])
        assert 0 <= row["top1"] <= row["top5"] <= 100 and sum(row["per_class_samples"].values()) == 16
    assert metrics["mean_top1"] == pytest.approx((rows["fashion"]["top1"] + rows["fashion-2-prompts"]["top1"]) / 2)
    assert metrics["mean_top5"] == pytest.approx((rows["fashion"]["top5"] + rows["fashion-2-prompts"]["top5"]) / 2)
    assert metrics["top1"] == metrics["mean_top1"] and metrics["top5"] == metrics["mean_top5"]
    for name in rows:
        assert (out / f"confusion_matrix_{name}.png").stat().st_size > 0
    assert not (out / "confusion_matrix.png").exists()
    assert not (out / "data").exists()  # data.val ("embedded" in the demo config) is not read with sets


def test_zero_shot_set_errors_are_one_line(clip_run, tiny_shards, tmp_path, capsys):
    same = json.dumps([{"name": "a", "shards": str(tiny_shards[1])}, {"name": "a", "shards": str(tiny_shards[1])}])
    assert finetune_main(zero_shot_argv(tmp_path / "x", clip_run, f"sets={same}")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last == "error: 'sets' names must be unique, got a more than once"
    bad_name = json.dumps([{"name": "a/b", "shards": str(tiny_shards[1])}])
    assert finetune_main(zero_shot_argv(tmp_path / "y", clip_run, f"sets={bad_name}")) == 2
    assert "'sets' name 'a/b' must be" in capsys.readouterr().err.strip().splitlines()[-1]
    no_shards = json.dumps([{"name": "a"}])
    assert finetune_main(zero_shot_argv(tmp_path / "z", clip_run, f"sets={no_shards}")) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: 'sets[0]'") and "shards" in last
