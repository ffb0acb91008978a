"""Feature export (task `features`, finetune/feature_export.py): chunked safetensors files read back equal to the
features `extract_features` computes, with the right labels and keys; unlabelled and image-text shards; k-NN from
the files equal to k-NN extracting itself; two processes writing the same rows as one."""
from __future__ import annotations

import contextlib
import json

import pytest
import torch
from safetensors import safe_open

from data import ShardStream, eval_transform
from finetune.cli import main as finetune_main
from finetune.config import FeatureConfig
from finetune.feature_export import read_feature_files, read_feature_index
from finetune.features import feature_encoder
from pretrain.features import extract_features
from pretrain.config import EncoderConfig

from test_knn import knn_argv, micro_checkpoint, torchrun_finetune


class _SingleProcess:
    """The parts of an accelerate.Accelerator that `extract_features` uses, for one process."""
    device = torch.device("cpu")
    process_index, num_processes, is_main_process = 0, 1, True

    @staticmethod
    def autocast():
        return contextlib.nullcontext()


@pytest.fixture(scope="module")
def vit_checkpoint(tmp_path_factory, micro_model):
    return micro_checkpoint(tmp_path_factory.mktemp("micro_vit"), micro_model)


def export_argv(out, tiny_shards, checkpoint, *overrides):
    train_dir, val_dir = tiny_shards
    return ["task=features", f"encoder.checkpoint={checkpoint}", f"data.train={train_dir}", f"data.val={val_dir}",
            "data.image_size=16", "data.num_workers=0", "train.batch_size=16", "train.mixed_precision=no",
            "logging.progress_bar=false", "chunk_size=10", "feature.pool=cls+avg", f"output_dir={out}", *overrides]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_shards, vit_checkpoint, single_thread):
    """The class token + average patch token of the micro ViT for the tiny train and val shards, 10 rows a file."""
    out = tmp_path_factory.mktemp("features") / "run"
    assert finetune_main(export_argv(out, tiny_shards, vit_checkpoint)) == 0
    return out


def labels_by_key(shards) -> dict[str, int]:
    stream = ShardStream(str(shards), lambda image: image, 64, train=False)
    return {key: int(label) for batch in stream for key, label in zip(batch["key"], batch["label"])}


def test_export_reads_back_equal_to_extract_features(exported, tiny_shards, vit_checkpoint):
    train_dir, _ = tiny_shards
    features, labels, keys = read_feature_files(exported / "train")
    encoder, description = feature_encoder(EncoderConfig(checkpoint=str(vit_checkpoint), global_pool=None,
                                                         drop_path=0.0), 16, FeatureConfig(pool="cls+avg"))
    expected, expected_labels, expected_keys = extract_features(
        encoder, str(train_dir), eval_transform(16, crop_fraction=1.0), 16, 0, _SingleProcess(), "test", progress=False)
    assert features.shape == (64, 64) and features.dtype == torch.float32
    assert torch.allclose(features, expected, atol=1e-6) and torch.equal(labels, expected_labels)
    assert len(set(keys)) == 64 and {k: int(v) for k, v in zip(keys, labels)} == labels_by_key(train_dir)
    assert keys == expected_keys
    index = read_feature_index(exported / "train")
    assert index["count"] == 64 and index["dim"] == 64 and index["feature"] == "cls+avg"
    assert index["encoder"] == description and index["kind"] == "labelled" and len(index["classes"]) == 10
    assert [c["rows"] for c in index["chunks"]] == [10] * 6 + [4]  # bounded files of chunk_size rows
    assert sorted(p.name for p in (exported / "train").iterdir()) == sorted([c["file"] for c in index["chunks"]]
                                                                           + ["index.json"])
    with safe_open(str(exported / "train" / index["chunks"][0]["file"]), framework="pt") as f:
        assert f.get_tensor("features").shape == (10, 64) and f.get_tensor("labels").dtype == torch.int64
        assert json.loads(f.metadata()["keys"]) == keys[:10]
    assert read_feature_index(exported / "val")["count"] == 16


def test_knn_from_exported_files_equals_knn_extracting(exported, tiny_shards, vit_checkpoint, tmp_path,
                                                       single_thread):
    runs = {
        "extracting": [f"encoder.checkpoint={vit_checkpoint}", "feature.pool=cls+avg"],
        "files": [f"train_features={exported / 'train'}", f"val_features={exported / 'val'}"],
        "bank from files": [f"encoder.checkpoint={vit_checkpoint}", "feature.pool=cls+avg",
                            f"train_features={exported / 'train'}"],
    }
    metrics = {}
    for name, overrides in runs.items():
        assert finetune_main(knn_argv(tmp_path / name.replace(" ", "_"), tiny_shards, *overrides)) == 0
        metrics[name] = json.loads((tmp_path / name.replace(" ", "_") / "metrics.json").read_text())
    assert metrics["files"] == metrics["extracting"] == metrics["bank from files"]
    assert metrics["files"]["feature"] == "cls+avg" and metrics["files"]["feature_dim"] == 64


def test_knn_refuses_features_of_another_kind(exported, tiny_shards, vit_checkpoint, tmp_path, capsys):
    argv = knn_argv(tmp_path / "x", tiny_shards, f"encoder.checkpoint={vit_checkpoint}",
                    f"train_features={exported / 'train'}")  # the bank is cls+avg, the config's feature the default
    assert finetune_main(argv) == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("error: the training and evaluation features differ in feature: 'cls+avg'")


def test_unlabelled_and_image_text_shards_export_without_labels(tiny_shards, tiny_pair_shards, vit_checkpoint,
                                                                tmp_path, single_thread):
    images = tmp_path / "images"
    assert finetune_main(export_argv(images, tiny_shards, vit_checkpoint, "kind=images", "splits=[val]",
                                     "dtype=float16")) == 0
    features, labels, keys = read_feature_files(images / "val")
    assert labels is None and features.shape == (16, 64) and len(set(keys)) == 16
    assert not (images / "train").exists()
    pairs = tmp_path / "pairs"
    assert finetune_main(export_argv(pairs, (tiny_pair_shards, tiny_shards[1]), vit_checkpoint, "kind=image-text",
                                     "splits=[train]")) == 0
    index = read_feature_index(pairs / "train")
    assert index["count"] == 64 and not index["labels"] and index["classes"] is None
    with safe_open(str(pairs / "train" / index["chunks"][0]["file"]), framework="pt") as f:
        assert len(json.loads(f.metadata()["captions"])) == 10 and "labels" not in f.keys()
    assert finetune_main(knn_argv(tmp_path / "knn", tiny_shards, f"train_features={pairs / 'train'}")) == 2


def test_two_process_export_writes_the_rows_of_one_process(exported, tiny_shards, vit_checkpoint, tmp_path):
    out = tmp_path / "export2"
    torchrun_finetune(*export_argv(out, tiny_shards, vit_checkpoint, "train.batch_size=8"))
    for split in ("train", "val"):
        index = read_feature_index(out / split)
        assert {c["file"].split("-")[1] for c in index["chunks"]} == {"rank000", "rank001"}  # each wrote its share
        one, one_labels, one_keys = read_feature_files(exported / split)
        two, two_labels, two_keys = read_feature_files(out / split)
        assert len(two_keys) == len(set(two_keys)) == len(one_keys)  # every sample once
        rows = {key: (row, label) for key, row, label in zip(two_keys, two, two_labels.tolist())}
        for key, row, label in zip(one_keys, one, one_labels.tolist()):
            assert rows[key][1] == label and torch.allclose(rows[key][0], row, atol=1e-5), key
