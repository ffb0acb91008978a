"""Feature export (task `features`): the frozen features of any encoder, or the raw pixels, for any shards, written
to disk once so that k-NN, probes and analyses read them instead of running the encoder again.

    python -m finetune --config configs/features_mae_tiny_demo.yaml    # -> runs/features_demo/{train,val}/

One folder per split (`data.train` -> OUTPUT_DIR/train, `data.val` -> OUTPUT_DIR/val), written in a bounded amount
of memory: each process streams its share of the shards (every sample once across processes) and writes a file
every `chunk_size` rows,

    features-rank{R:03d}-{I:06d}.safetensors
        "features"  [n, D] float32 (or float16, `dtype`)
        "labels"    [n] int64, labelled shards only
        metadata    "keys": JSON list of the n sample keys; "captions": JSON list, image-text shards only

then the main process writes `index.json` last (written under a temporary name and renamed: a folder without one
is an unfinished export): the chunk files in order with their row counts, `count`, `dim`, `dtype`, `feature` (which
feature, finetune/features.py), `encoder` (where its weights came from), `shards`, `kind`, `classes` (labelled
shards: the class names of their stats.json) and `skipped` (unreadable samples by reason).

`read_feature_files(folder) -> (features [N, D] float32, labels [N] int64 or None, keys)` reads them back.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from data import DataError, eval_transform, read_class_names
from pretrain.config import ConfigError
from pretrain.features import iter_features
from pretrain.run import setup_run

from .config import FeatureExportConfig
from .features import feature_encoder

log = logging.getLogger(__name__)

INDEX_FILE = "index.json"
CHUNK_PATTERN = "features-rank*.safetensors"
FORMAT_VERSION = 1


class FeatureWriter:
    """One process's chunk files in `directory`: rows are buffered and written every `chunk_size` rows."""

    def __init__(self, directory: Path, rank: int, chunk_size: int, dtype: torch.dtype = torch.float32):
        self.directory, self.rank, self.chunk_size, self.dtype = Path(directory), rank, chunk_size, dtype
        self.buffer: dict[str, list] = {"features": [], "labels": [], "keys": [], "captions": []}
        self.buffered = 0
        self.chunks: list[dict[str, Any]] = []

    def add(self, features: torch.Tensor, keys: list[str], labels: Optional[torch.Tensor] = None,
            captions: Optional[list[str]] = None) -> None:
        """features [B, D], keys: B strings, labels [B], captions: B strings."""
        self.buffer["features"].append(features.to(self.dtype))
        self.buffer["keys"].extend(keys)
        if labels is not None:
            self.buffer["labels"].append(labels.long())
        if captions is not None:
            self.buffer["captions"].extend(captions)
        self.buffered += len(keys)
        while self.buffered >= self.chunk_size:
            self._write(self.chunk_size)

    def close(self) -> list[dict[str, Any]]:
        """Write what is left; the chunks written, in order: [{"file", "rows", "dim"}]."""
        if self.buffered:
            self._write(self.buffered)
        return self.chunks

    def _write(self, rows: int) -> None:
        from safetensors.torch import save_file

        features = torch.cat(self.buffer["features"])
        tensors = {"features": features[:rows].contiguous()}
        self.buffer["features"] = [features[rows:]]
        if self.buffer["labels"]:
            labels = torch.cat(self.buffer["labels"])
            tensors["labels"] = labels[:rows].contiguous()
            self.buffer["labels"] = [labels[rows:]]
        metadata = {"keys": json.dumps(self.buffer["keys"][:rows])}
        self.buffer["keys"] = self.buffer["keys"][rows:]
        if self.buffer["captions"]:
            metadata["captions"] = json.dumps(self.buffer["captions"][:rows])
            self.buffer["captions"] = self.buffer["captions"][rows:]
        name = f"features-rank{self.rank:03d}-{len(self.chunks):06d}.safetensors"
        temporary = self.directory / f".{name}.tmp"
        save_file(tensors, str(temporary), metadata=metadata)
        os.replace(temporary, self.directory / name)
        self.chunks.append({"file": name, "rows": rows, "dim": int(features.shape[1])})
        self.buffered -= rows


@torch.no_grad()
def export_features(encoder: nn.Module, shards: str, directory: Path, transform, accelerator, *, kind: str,
                    batch_size: int, num_workers: int, chunk_size: int, dtype: torch.dtype, description: str,
                    max_skip_rate: float = 0.5, progress: bool = True) -> dict[str, Any]:
    """Write the features of `shards` (every sample once across processes) to `directory`; returns the index.
    Every process calls it. An earlier export in `directory` is replaced."""
    directory = Path(directory)
    if accelerator.is_main_process:
        directory.mkdir(parents=True, exist_ok=True)
        for old in [directory / INDEX_FILE, *directory.glob(CHUNK_PATTERN), *directory.glob(".features-*.tmp")]:
            old.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    writer = FeatureWriter(directory, accelerator.process_index, chunk_size, dtype)
    skipped: Counter = Counter()
    for batch in iter_features(encoder, shards, transform, batch_size, num_workers, accelerator,
                               f"features ({directory.name})", max_skip_rate, kind=kind,
                               progress=progress):
        writer.add(batch["features"], batch["key"], batch.get("label"), batch.get("caption"))
        skipped.update(batch.get("skipped", {}))
    from accelerate.utils import gather_object

    chunks = gather_object(writer.close())  # every process's chunks, in rank order
    skipped_total = sum((Counter(part) for part in gather_object([dict(skipped)])), Counter())
    classes = None
    if kind == "labelled":
        try:
            classes = read_class_names(shards)
        except DataError:  # labelled shards without a stats.json: labels, no names
            classes = None
    index = {
        "format": FORMAT_VERSION, "count": sum(chunk["rows"] for chunk in chunks),
        "dim": chunks[0]["dim"] if chunks else None, "dtype": str(dtype).removeprefix("torch."),
        "feature": getattr(encoder, "kind", None), "encoder": description, "shards": shards, "kind": kind,
        "labels": kind == "labelled", "classes": classes, "skipped": dict(skipped_total),
        "chunks": [{"file": chunk["file"], "rows": chunk["rows"]} for chunk in chunks],
    }
    if accelerator.is_main_process:
        temporary = directory / f".{INDEX_FILE}.tmp"
        temporary.write_text(json.dumps(index, indent=2))
        os.replace(temporary, directory / INDEX_FILE)
    accelerator.wait_for_everyone()
    return index


def read_feature_index(directory: str | Path) -> dict[str, Any]:
    """The index.json of a feature export folder (ConfigError naming the folder when there is none)."""
    index_file = Path(directory) / INDEX_FILE
    if not index_file.is_file():
        what = "an unfinished export (index.json is written last)" if any(Path(directory).glob(CHUNK_PATTERN)) \
            else "not a feature export folder (python -m finetune task=features writes one)"
        raise ConfigError(f"{directory} has no {INDEX_FILE}: {what}")
    return json.loads(index_file.read_text())


def read_feature_files(directory: str | Path) -> tuple[torch.Tensor, Optional[torch.Tensor], list[str]]:
    """A feature export folder -> (features [N, D] float32, labels [N] int64 (None unless labelled), the N sample
    keys), rows in the index's order."""
    from safetensors import safe_open

    directory = Path(directory)
    index = read_feature_index(directory)
    features, labels, keys = [], [], []
    for chunk in index["chunks"]:
        path = directory / chunk["file"]
        if not path.is_file():
            raise ConfigError(f"{path}, listed in {directory / INDEX_FILE}, is missing")
        with safe_open(str(path), framework="pt") as f:
            rows = f.get_tensor("features")
            chunk_keys = json.loads((f.metadata() or {}).get("keys", "[]"))
            if index["labels"]:
                labels.append(f.get_tensor("labels"))
        if len(rows) != chunk["rows"] or len(chunk_keys) != chunk["rows"]:
            raise ConfigError(f"{path} holds {len(rows)} rows and {len(chunk_keys)} keys, its index says "
                              f"{chunk['rows']}")
        features.append(rows.float())
        keys.extend(chunk_keys)
    dim = index["dim"] or 0
    return (torch.cat(features) if features else torch.zeros(0, dim),
            (torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long)) if index["labels"] else None, keys)


def run_feature_export(cfg: FeatureExportConfig) -> dict[str, Any]:
    from dataclasses import replace

    if "val" not in cfg.splits:
        cfg = replace(cfg, data=replace(cfg.data, val=None))
    run = setup_run(cfg, train_data="train" in cfg.splits)
    accelerator = run.accelerator
    encoder, description = feature_encoder(cfg.encoder, cfg.data.image_size, cfg.feature)
    encoder.to(accelerator.device)
    transform = eval_transform(cfg.data.image_size, crop_fraction=cfg.data.eval_crop_fraction, mean=cfg.data.mean,
                               std=cfg.data.std)
    dtype = {"float32": torch.float32, "float16": torch.float16}[cfg.dtype]
    indexes = {}
    for split in cfg.splits:
        shards = run.train_shards if split == "train" else run.val_shards
        indexes[split] = export_features(
            encoder, shards, run.output_dir / split, transform, accelerator, kind=cfg.kind,
            batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers, chunk_size=cfg.chunk_size,
            dtype=dtype, description=description, max_skip_rate=cfg.data.max_skip_rate,
            progress=cfg.logging.progress_bar)
        log.info("features (%s, %s) of %d %s images, dimension %s: %s", encoder.kind, description,
                 indexes[split]["count"], split, indexes[split]["dim"], run.output_dir / split)
    return indexes
