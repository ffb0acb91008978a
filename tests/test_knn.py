"""k-NN evaluation (finetune/knn.py): DINO's weighted vote against a brute-force implementation, chunking, the
feature kinds of finetune/features.py (ViT, Swin, pixels), and the `knn` task end to end in one and two processes."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest
import torch

from finetune.cli import main as finetune_main
from finetune.config import FeatureConfig
from finetune.features import feature_encoder
from finetune.knn import knn_accuracy
from pretrain.config import ConfigError, EncoderConfig

REPO = Path(__file__).resolve().parents[1]


def torchrun_finetune(*args: str) -> None:
    """`python -m finetune ARGS` in 2 CPU processes (gloo), as tests/test_distributed.py launches them."""
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "finetune", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"})
    assert result.returncode == 0, result.stderr[-3000:]


def micro_checkpoint(directory, model_name: str, **kwargs):
    """A randomly initialised pretraining model saved as `python -m pretrain` saves it (its metadata rebuilds it in
    any process, the micro test model included)."""
    from pretrain.checkpoint import save_checkpoint
    from pretrain.models import create_model
    from pretrain.train_mae import model_metadata

    torch.manual_seed(0)
    model = create_model(model_name, **kwargs)
    save_checkpoint(directory / "checkpoints", 1, model.state_dict(), {"step": 1}, {},
                    model_metadata=model_metadata(model, model_name, "mae"))
    return directory


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory, micro_model):
    return micro_checkpoint(tmp_path_factory.mktemp("micro_vit"), micro_model)


# ------------------------------------------------------------------------------------------------ the classifier

def brute_force_knn(train, train_labels, test, test_labels, k, temperature):
    """DINO's rule written out one test sample at a time: (top-1 hits, top-5 hits)."""
    train = torch.nn.functional.normalize(train.double(), dim=1)
    test = torch.nn.functional.normalize(test.double(), dim=1)
    top1 = top5 = 0
    for x, y in zip(test, test_labels.tolist()):
        similarities = [float(x @ t) for t in train]
        neighbours = sorted(range(len(train)), key=lambda i: -similarities[i])[:k]
        votes = defaultdict(float)
        for i in neighbours:
            votes[int(train_labels[i])] += math.exp(similarities[i] / temperature)
        ranked = sorted(votes, key=lambda c: -votes[c])  # only classes someone voted for
        top1 += ranked[0] == y
        top5 += y in ranked[:5]
    return top1, top5


def clustered_features(n, num_classes, dim, generator):
    labels = torch.randint(num_classes, (n,), generator=generator)
    centres = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(7))
    return centres[labels] + 1.5 * torch.randn(n, dim, generator=generator), labels


def test_knn_equals_brute_force_for_every_k_and_chunking():
    generator = torch.Generator().manual_seed(0)
    num_classes, ks, temperature = 9, [1, 3, 10, 20, 50], 0.07
    train, train_labels = clustered_features(150, num_classes, 12, generator)
    test, test_labels = clustered_features(41, num_classes, 12, generator)
    unchunked = knn_accuracy(test, test_labels, train, train_labels, ks, temperature, num_classes, chunk_size=10**6)
    for k in ks:
        top1, top5 = brute_force_knn(train, train_labels, test, test_labels, k, temperature)
        counts = unchunked[k].counts.sum(dim=1)
        assert (int(counts[0]), int(counts[1]), int(counts[2])) == (top1, top5, 41), k
        assert 0 < top1 < top5 < 41 or k == 1  # neither trivial nor hopeless
    for chunk_size in (1, 7, 40):
        chunked = knn_accuracy(test, test_labels, train, train_labels, ks, temperature, num_classes, chunk_size)
        for k in ks:
            assert torch.equal(chunked[k].counts, unchunked[k].counts), (chunk_size, k)


def test_a_class_without_votes_is_never_a_prediction():
    """3 neighbours, all of class 0: classes 1..9 have no vote, so label 3 is missed at top-5 too (DINO's sort would
    rank the unvoted classes in an arbitrary order after class 0)."""
    train, train_labels = torch.randn(3, 4) + 10, torch.zeros(3, dtype=torch.long)
    accuracy = knn_accuracy(torch.randn(2, 4) + 10, torch.tensor([3, 0]), train, train_labels, [3], 0.07, 10)[3]
    assert accuracy.counts.sum(dim=1).tolist() == [1.0, 1.0, 2.0]


def test_small_temperatures_do_not_overflow():
    generator = torch.Generator().manual_seed(1)
    train, train_labels = clustered_features(60, 4, 8, generator)
    test, test_labels = clustered_features(20, 4, 8, generator)
    tiny = knn_accuracy(test, test_labels, train, train_labels, [10], 0.001, 4)[10].counts
    assert tiny.sum(dim=1)[2] == 20 and torch.isfinite(tiny).all()
    assert torch.equal(tiny[0], knn_accuracy(test, test_labels, train, train_labels, [1], 0.07, 4)[1].counts[0])


def test_k_larger_than_the_bank_is_refused():
    with pytest.raises(ConfigError, match="'k' 20 exceeds the 5 training features"):
        knn_accuracy(torch.randn(2, 3), torch.zeros(2, dtype=torch.long), torch.randn(5, 3),
                     torch.zeros(5, dtype=torch.long), [10, 20], 0.07, 2)


# ------------------------------------------------------------------------------------------------ feature kinds

def vit_tokens_by_hand(vit, images):
    """Every block's output after the final norm, computed block by block: [depth] x [B, 1 + N, D]."""
    x = vit.norm_pre(vit._pos_embed(vit.patch_embed(images)))
    outputs = []
    for block in vit.blocks:
        x = block(x)
        outputs.append(vit.norm(x))
    return outputs


def test_vit_feature_kinds(micro_model):
    """A 3-block micro ViT (random init through the same road as checkpoints): cls, avg, cls+avg and DINOv2's last
    N blocks, each from the tokens after the final norm."""
    cfg = EncoderConfig(model_name=micro_model, model_kwargs={"depth": 3}, global_pool=None, drop_path=0.0)
    images = torch.randn(2, 3, 16, 16)

    def build(feature=None):
        torch.manual_seed(0)  # the same random weights every time
        return feature_encoder(cfg, 16, feature)

    default, description = build()
    assert description.startswith("random init")
    tokens = vit_tokens_by_hand(default.model, images)
    cls, avg = tokens[-1][:, 0], tokens[-1][:, 1:].mean(dim=1)
    assert torch.allclose(default(images), cls, atol=1e-5)  # unchanged default: the class token
    expected = {
        (None, 1): cls, ("cls", 1): cls, ("avg", 1): avg, ("cls+avg", 1): torch.cat([cls, avg], dim=1),
        ("cls", 3): torch.cat([t[:, 0] for t in tokens], dim=1),
        ("cls+avg", 2): torch.cat([tokens[1][:, 0], tokens[2][:, 0], avg], dim=1),
    }
    for (pool, blocks), want in expected.items():
        module, _ = build(FeatureConfig(pool=pool, blocks=blocks))
        got = module(images)
        assert got.shape == want.shape and torch.allclose(got, want, atol=1e-5), (pool, blocks)
    assert build(FeatureConfig(pool="cls", blocks=3))[0].kind == "cls x3 blocks"
    with pytest.raises(ConfigError, match="needs feature.pool=cls or cls\\+avg"):
        FeatureConfig(pool="avg", blocks=2)
    with pytest.raises(ConfigError, match="encoder.global_pool=null"):
        feature_encoder(EncoderConfig(model_name=micro_model, global_pool="avg", drop_path=0.0), 16,
                        FeatureConfig(pool="cls"))


def test_swin_and_pixel_feature_kinds(tmp_path):
    """A UM-MAE Swin has no class token: cls is its average-pooled last stage (said in `kind`), cls+avg and last N
    blocks are refused by name; the pixels have only their own feature."""
    checkpoint = micro_checkpoint(tmp_path, "ummae_swin_tiny_cpu")
    cfg = EncoderConfig(checkpoint=str(checkpoint), global_pool=None, drop_path=0.0)
    images = torch.randn(2, 3, 32, 32)
    default, _ = feature_encoder(cfg, 32)
    stage = default.model.forward_features(images).mean(dim=(1, 2))
    for pool in (None, "cls", "avg"):
        module, _ = feature_encoder(cfg, 32, FeatureConfig(pool=pool))
        assert torch.allclose(module(images), stage, atol=1e-6) and module(images).shape == (2, 192)
    assert feature_encoder(cfg, 32, FeatureConfig(pool="cls"))[0].kind == "avg (no class token)"
    with pytest.raises(ConfigError, match="SwinTransformer has no class token.*use feature.pool=avg"):
        feature_encoder(cfg, 32, FeatureConfig(pool="cls+avg"))
    with pytest.raises(ConfigError, match="'feature.blocks' 2 .* SwinTransformer has no class token"):
        feature_encoder(cfg, 32, FeatureConfig(pool="cls", blocks=2))
    pixels, description = feature_encoder(EncoderConfig(source="pixels"), 32)
    assert description == "raw pixels" and pixels(images).shape == (2, 3 * 32 * 32)
    with pytest.raises(ConfigError, match="encoder.source=pixels"):
        feature_encoder(EncoderConfig(source="pixels"), 32, FeatureConfig(pool="cls"))


# ------------------------------------------------------------------------------------------------ the task

def knn_argv(out, tiny_shards, *overrides):
    train_dir, val_dir = tiny_shards
    return ["task=knn", f"data.train={train_dir}", f"data.val={val_dir}", "data.image_size=16",
            "data.num_workers=0", "train.batch_size=16", "train.mixed_precision=no", "logging.progress_bar=false",
            "k=[5,10,20]", f"output_dir={out}", *overrides]


@pytest.fixture(scope="module")
def one_process_knn(tmp_path_factory, tiny_shards, vit_checkpoint, single_thread):
    out = tmp_path_factory.mktemp("knn") / "run"
    assert finetune_main(knn_argv(out, tiny_shards, f"encoder.checkpoint={vit_checkpoint}", "chunk_size=5")) == 0
    return out


def test_knn_task_writes_metrics(one_process_knn):
    metrics = json.loads((one_process_knn / "metrics.json").read_text())
    assert sorted(metrics["k"]) == ["10", "20", "5"]
    assert all(0 <= r["top1"] <= r["top5"] <= 100 for r in metrics["k"].values())
    assert metrics["num_train"] == 64 and metrics["num_test"] == 16 and metrics["num_classes"] == 10
    assert metrics["feature_dim"] == 32 and metrics["temperature"] == 0.07
    assert "MAE checkpoint" in metrics["encoder"] and metrics["feature"] == "pooled (token)"
    assert (one_process_knn / "confusion_matrix.png").stat().st_size > 0


def test_knn_task_with_k_above_the_bank_is_one_clear_error(tiny_shards, tmp_path, capsys, single_thread):
    assert finetune_main(knn_argv(tmp_path / "x", tiny_shards, "encoder.source=pixels", "k=[100]")) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == \
        "error: 'k' 100 exceeds the 64 training features: choose k <= 64"


def test_two_process_knn_equals_one_process(one_process_knn, tiny_shards, vit_checkpoint, tmp_path):
    """Each process extracts its share of both sets, gathers the bank, classifies its share of the evaluation
    images; the summed counts equal the one-process run's."""
    out = tmp_path / "knn2"
    torchrun_finetune(*knn_argv(out, tiny_shards, f"encoder.checkpoint={vit_checkpoint}", "chunk_size=3",
                                   "train.batch_size=8"))
    assert json.loads((out / "metrics.json").read_text()) == json.loads((one_process_knn / "metrics.json").read_text())
    assert (out / "confusion_matrix.png").stat().st_size > 0  # counts summed over both processes
