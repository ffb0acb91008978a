"""Tests of the data layer: sources -> shard writer -> shard expansion -> ShardStream, on tiny data made here."""

import gzip
import io
import json
import re
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from data import (
    DataError,
    FASHION_MNIST_CLASSES,
    ShardOptions,
    ShardStream,
    ShardWriter,
    count_samples,
    ensure_embedded_shards,
    eval_transform,
    expand_shards,
    mae_train_transform,
    read_categories,
    read_class_names,
    read_idx,
    read_image_folder,
    read_manifest,
    read_shard_stats,
    split_val_indices,
    write_labelled_shards,
)
from data.__main__ import main as data_cli

from stream_helpers import as_uint8_tensor, collect, keys_of, total_skipped

# ------------------------------------------------------------------------------------------------ helpers


def write_idx(directory: Path, images: np.ndarray, labels: np.ndarray, gz: bool = True) -> tuple[Path, Path]:
    """Write an MNIST-style IDX pair: images uint8 [N, rows, cols], labels uint8 [N]."""
    image_bytes = struct.pack(">IIII", 2051, *images.shape) + images.astype(np.uint8).tobytes()
    label_bytes = struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes()
    suffix = ".gz" if gz else ""
    images_path = directory / f"images-idx3-ubyte{suffix}"
    labels_path = directory / f"labels-idx1-ubyte{suffix}"
    images_path.write_bytes(gzip.compress(image_bytes) if gz else image_bytes)
    labels_path.write_bytes(gzip.compress(label_bytes) if gz else label_bytes)
    return images_path, labels_path


def tiny_images(count: int, size: int = 8, num_classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, size, size), dtype=np.uint8), np.arange(count, dtype=np.uint8) % num_classes


def encoded(color, size=(10, 10), fmt="PNG") -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format=fmt)
    return buffer.getvalue()


def idx_shards(tmp_path: Path, count: int, shard_size: int) -> tuple[Path, np.ndarray, np.ndarray]:
    images, labels = tiny_images(count)
    class_names, samples = read_idx(*write_idx(tmp_path, images, labels))
    out = tmp_path / "shards"
    write_labelled_shards(samples, out, class_names, options=ShardOptions(shard_size=shard_size, progress=False))
    return out, images, labels


# ------------------------------------------------------------------------------------------------ sources


def test_idx_round_trip_through_plain_webdataset_and_shard_stream(tmp_path):
    out, images, labels = idx_shards(tmp_path, count=24, shard_size=10)
    stats = json.loads((out / "stats.json").read_text())
    assert stats["samples"] == 24
    assert stats["shards"] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert stats["shard_counts"] == {"train-000000.tar": 10, "train-000001.tar": 10, "train-000002.tar": 4}
    assert stats["classes"] == ["0", "1", "2"]
    assert stats["class_counts"] == {"0": 8, "1": 8, "2": 8}
    assert stats["skipped"] == {} and stats["skipped_examples"] == []
    assert stats["bytes"] == sum((out / name).stat().st_size for name in stats["shards"])

    # A plain webdataset pipeline reads the shards without knowing about this package.
    dataset = wds.WebDataset(expand_shards(out), shardshuffle=False).decode("pil").to_tuple("png", "cls")
    read = list(dataset)
    assert len(read) == 24
    for index, (image, cls) in enumerate(read):  # webdataset's "pil" decoder hands out RGB
        np.testing.assert_array_equal(np.array(image), np.repeat(images[index][..., None], 3, axis=2))
        assert int(cls) == labels[index]
    stored = next(iter(wds.WebDataset(str(out / "train-000000.tar"), shardshuffle=False)))
    assert Image.open(io.BytesIO(stored["png"])).mode == "L"  # stored as lossless greyscale PNG

    stream = ShardStream(expand_shards(out), as_uint8_tensor(), batch_size=5, train=False)
    batches = collect(stream, num_workers=0)
    assert [len(b["key"]) for b in batches] == [5, 5, 5, 5, 4]  # the last eval batch may be partial
    pixels = torch.cat([b["image"] for b in batches])  # [24, 3, 8, 8], greyscale copied to all channels
    assert pixels.shape == (24, 3, 8, 8)
    assert torch.equal(pixels, torch.from_numpy(images)[:, None].expand(-1, 3, -1, -1))
    assert torch.cat([b["label"] for b in batches]).tolist() == labels.tolist()
    assert all(b["skipped"] == {} for b in batches)


def test_idx_raw_files_and_class_names(tmp_path):
    images, labels = tiny_images(6)
    class_names, samples = read_idx(*write_idx(tmp_path, images, labels, gz=False), class_names=["a", "b", "c"])
    assert class_names == ["a", "b", "c"] and len(samples) == 6
    first = next(iter(samples))
    assert first.ext == "png" and first.label == 0
    np.testing.assert_array_equal(np.array(Image.open(io.BytesIO(first.image_bytes))), images[0])
    with pytest.raises(DataError, match="only 2 class names"):
        read_idx(*write_idx(tmp_path, images, labels), class_names=["a", "b"])


def test_idx_bad_magic_and_count_mismatch_name_the_file(tmp_path):
    images_path, labels_path = write_idx(tmp_path, *tiny_images(4))
    with pytest.raises(DataError, match=r"labels-idx1-ubyte\.gz.*bad IDX magic number 2049"):
        read_idx(labels_path, images_path)  # swapped
    (tmp_path / "short").mkdir()
    _, fewer_labels = write_idx(tmp_path / "short", *tiny_images(3))
    with pytest.raises(DataError, match="holds 4 images but .*holds 3 labels"):
        read_idx(images_path, fewer_labels)
    truncated = tmp_path / "truncated-idx3-ubyte"
    truncated.write_bytes(gzip.decompress(images_path.read_bytes())[:-5])
    with pytest.raises(DataError, match="truncated-idx3-ubyte: header promises 4 items"):
        read_idx(truncated, labels_path)


def test_image_folder_skips_corrupt_file_and_strict_raises(tmp_path):
    root = tmp_path / "photos"
    for class_name, files in {"dog": {"d1.png": encoded("red"), "broken.png": b"not an image"},
                              "cat": {"c1.jpg": encoded("blue", fmt="JPEG"), "nested/c2.PNG": encoded("green")}}.items():
        for name, payload in files.items():
            (root / class_name / name).parent.mkdir(parents=True, exist_ok=True)
            (root / class_name / name).write_bytes(payload)
    (root / "cat" / "notes.txt").write_text("not picked up: not an image extension")

    class_names, samples = read_image_folder(root)
    assert class_names == ["cat", "dog"] and len(samples) == 4
    [written] = write_labelled_shards(samples, tmp_path / "out", class_names, options=ShardOptions(progress=False))
    assert written.directory == tmp_path / "out"
    stats = written.stats
    assert stats["samples"] == 3
    assert stats["class_counts"] == {"cat": 2, "dog": 1}
    assert stats["skipped"] == {"undecodable_image": 1}
    assert stats["skipped_examples"][0]["source"].endswith("broken.png")
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["skipped"] == {"undecodable_image": 1}

    read = list(wds.WebDataset(str(tmp_path / "out" / "train-000000.tar"), shardshuffle=False).decode("pil"))
    assert sorted(next(k for k in s if k in ("png", "jpg")) for s in read) == ["jpg", "png", "png"]
    assert sorted(int(s["cls"]) for s in read) == [0, 0, 1]

    with pytest.raises(DataError, match="broken.png.*undecodable image"):
        write_labelled_shards(read_image_folder(root).samples, tmp_path / "strict", class_names,
                              options=ShardOptions(strict=True, progress=False))
    assert not list((tmp_path / "strict").glob("*.tar*"))  # the aborted shard left nothing behind
    with pytest.raises(DataError, match="does not exist"):
        read_image_folder(tmp_path / "nowhere")


def test_manifest_csv_names_and_jsonl_ids(tmp_path):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(encoded("red"))
    (tmp_path / "img" / "b.jpg").write_bytes(encoded("blue", fmt="JPEG"))
    (tmp_path / "c.png").write_bytes(encoded("green"))
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("path,label\nimg/a.png,zebra\nimg/b.jpg,ant\nmissing.png,ant\n"
                        f"{tmp_path / 'c.png'},zebra\n")
    class_names, samples = read_manifest(csv_file)
    assert class_names == ["ant", "zebra"]
    assert [s.label for s in samples] == [1, 0, 0, 1]
    [written] = write_labelled_shards(samples, tmp_path / "csv_out", class_names, options=ShardOptions(progress=False))
    stats = written.stats
    assert stats["samples"] == 3 and stats["class_counts"] == {"ant": 1, "zebra": 2}
    assert stats["skipped"] == {"unreadable_file": 1}
    assert "missing.png" in stats["skipped_examples"][0]["source"]
    assert "labels.csv:4" in stats["skipped_examples"][0]["source"]

    jsonl_file = tmp_path / "labels.jsonl"
    jsonl_file.write_text('{"path": "img/a.png", "label": 2}\n\n{"path": "c.png", "label": 0}\n')
    class_names, samples = read_manifest(jsonl_file)
    assert class_names == ["0", "1", "2"] and [s.label for s in samples] == [2, 0]


@pytest.mark.parametrize("name, text, message", [
    ("no_label.csv", "path,lbl\na.png,1\n", r"no_label.csv:1: .*missing label"),
    ("empty_cell.csv", "path,label\na.png,1\nb.png,\n", r"empty_cell.csv:3: "),
    ("no_label.jsonl", '{"path": "a.png", "label": 1}\n{"path": "b.png"}\n', r"no_label.jsonl:2: "),
    ("not_json.jsonl", '{"path": "a.png", "label": 1}\n{oops\n', r"not_json.jsonl:2: not valid JSON"),
])
def test_manifest_bad_rows_name_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        read_manifest(tmp_path / name)


# ------------------------------------------------------------------------------------------------ writer + CLI


def test_shard_writer_rolls_over_and_never_leaves_partial_shards(tmp_path):
    payload = encoded("red")
    with ShardWriter(tmp_path, prefix="x", max_samples=100, max_bytes=3 * len(payload) + 10) as writer:
        for i in range(7):
            writer.write({"__key__": f"{i:03d}", "png": payload, "cls": b"0"})
    assert writer.shard_counts == {"x-000000.tar": 3, "x-000001.tar": 3, "x-000002.tar": 1}

    with pytest.raises(RuntimeError):
        with ShardWriter(tmp_path / "interrupted", max_samples=2) as writer:
            for i in range(3):
                writer.write({"__key__": f"{i:03d}", "png": payload, "cls": b"0"})
            raise RuntimeError("killed")
    assert sorted(p.name for p in (tmp_path / "interrupted").iterdir()) == ["train-000000.tar"]


def test_cli_idx_with_split_and_error_exit(tmp_path, capsys):
    images_path, labels_path = write_idx(tmp_path, *tiny_images(20))
    out = tmp_path / "out"
    code = data_cli(["idx", "--images", str(images_path), "--labels", str(labels_path), "--out", str(out),
                     "--classes", "a", "b", "c", "--val-fraction", "0.25", "--shard-size", "4", "--no-progress"])
    assert code == 0
    train, val = (json.loads((out / split / "stats.json").read_text()) for split in ("train", "val"))
    assert (train["samples"], val["samples"]) == (15, 5)
    assert train["classes"] == ["a", "b", "c"] and len(train["shards"]) == 4 and val["shards"] == ["val-000000.tar",
                                                                                                 "val-000001.tar"]
    train_keys = {s["__key__"] for s in wds.WebDataset(expand_shards(out / "train"), shardshuffle=False)}
    val_keys = {s["__key__"] for s in wds.WebDataset(expand_shards(out / "val"), shardshuffle=False)}
    assert not train_keys & val_keys and len(train_keys | val_keys) == 20
    assert "15 samples in 4 shard(s), 3 classes" in capsys.readouterr().out

    code = data_cli(["idx", "--images", str(labels_path), "--labels", str(labels_path), "--out", str(out)])
    error_output = capsys.readouterr().err.strip()
    assert code == 2
    assert error_output.startswith("error: ") and "labels-idx1-ubyte.gz" in error_output
    assert len(error_output.splitlines()) == 1


def test_labelled_split_is_deterministic_by_seed(tmp_path):
    images, labels = tiny_images(30)
    paths = write_idx(tmp_path, images, labels)

    def val_keys(out, seed):
        class_names, samples = read_idx(*paths)
        train, val = write_labelled_shards(samples, out, class_names, val_fraction=0.2, seed=seed,
                                           options=ShardOptions(progress=False))
        assert (train.directory, val.directory) == (out / "train", out / "val")
        assert (train.stats["samples"], val.stats["samples"]) == (24, 6)
        return {s["__key__"] for s in wds.WebDataset(expand_shards(out / "val"), shardshuffle=False)}

    first, again, other = val_keys(tmp_path / "a", 1), val_keys(tmp_path / "b", 1), val_keys(tmp_path / "c", 2)
    assert len(first) == 6 and first == again and first != other
    # the same split without writing shards (an IDX sample's key is its index)
    assert {int(key) for key in first} == split_val_indices(30, 0.2, 1)
    assert {int(key) for key in other} == split_val_indices(30, 0.2, 2)


# ------------------------------------------------------------------------------------------------ shard specs


def test_expand_shards_and_count_samples(tmp_path):
    out, _, _ = idx_shards(tmp_path, count=24, shard_size=6)  # 4 shards
    names = [str(out / f"train-{i:06d}.tar") for i in range(4)]
    assert expand_shards(out) == names
    assert expand_shards(f"{out}/train-{{000000..000003}}.tar") == names
    assert expand_shards([names[0], f"{out}/train-{{000002..000003}}.tar"]) == [names[0]] + names[2:]
    assert expand_shards(f"{names[1]},{out}/train-{{000002,000003}}.tar") == names[1:]
    (out / "list.txt").write_text("# my shards\ntrain-000000.tar\n\ntrain-000003.tar\n")
    assert expand_shards(out / "list.txt") == [names[0], names[3]]

    with pytest.raises(DataError, match="train-000004.tar .*nor do 5 more"):
        expand_shards(f"{out}/train-{{000000..000009}}.tar")
    with pytest.raises(DataError, match="nowhere"):
        expand_shards(tmp_path / "nowhere")
    with pytest.raises(DataError, match="gone.tar"):
        expand_shards([names[0], str(out / "gone.tar")])

    assert count_samples(out) == 24
    assert count_samples(names[1:3]) == 12  # per-shard counts from stats.json
    (out / "stats.json").unlink()
    with pytest.warns(UserWarning, match="counted samples by reading"):
        assert count_samples(names) == 24


def test_read_shard_stats_and_class_names_from_the_stats_json_beside_the_shards(tmp_path):
    out, _, _ = idx_shards(tmp_path, count=12, shard_size=5)  # 3 shards
    stats_file = out / "stats.json"
    names = expand_shards(out)
    for spec in (out, str(out), names, names[1:], f"{out}/train-{{000001..000002}}.tar", out / "shards.txt"):
        assert read_shard_stats(spec) == json.loads(stats_file.read_text())
        assert read_class_names(spec) == ["0", "1", "2"]
    with pytest.raises(DataError, match=re.escape(f"{stats_file} lists no categories: data.train must be detection "
                                                  "shards written by `python -m data coco`")):
        read_categories(out)

    stats_file.write_text(json.dumps({**json.loads(stats_file.read_text()), "classes": []}))
    with pytest.raises(DataError, match=re.escape(f"{stats_file} lists no classes: these are not labelled shards")):
        read_class_names(out)
    stats_file.write_text("{not json")
    for read in (read_shard_stats, count_samples):
        with pytest.raises(DataError, match=re.escape(f"{stats_file}: cannot read shard statistics")):
            read(out)
    stats_file.unlink()
    for read in (read_shard_stats, read_class_names, read_categories):
        with pytest.raises(DataError, match=re.escape(f"{stats_file} does not exist: shard statistics are written "
                                                      "by `python -m data`")):
            read(names)


# ------------------------------------------------------------------------------------------------ ShardStream


@pytest.mark.parametrize("shard_size", [4, 100])  # 6 shards >= 4 slots; 1 shard < 4 slots
def test_eval_two_ranks_two_workers_see_every_sample_once(tmp_path, shard_size):
    out, _, _ = idx_shards(tmp_path, count=23, shard_size=shard_size)
    keys = []
    for rank in range(2):
        stream = ShardStream(expand_shards(out), as_uint8_tensor(), batch_size=4, train=False, rank=rank,
                             world_size=2)
        keys += keys_of(collect(stream, num_workers=2))
    assert sorted(keys) == [f"{i:07d}" for i in range(23)]


def test_eval_one_shard_feeds_four_slots_disjointly(tmp_path):
    # Evaluation splits by sample when shards are fewer than slots (finite training refuses: tests/test_stream.py).
    out, _, _ = idx_shards(tmp_path, count=24, shard_size=100)
    assert len(expand_shards(out)) == 1
    keys = []
    for rank in range(2):
        stream = ShardStream(expand_shards(out), as_uint8_tensor(), batch_size=3, train=False, rank=rank,
                             world_size=2)
        # Each slot holds 6 samples: 2 batches per worker, 4 per rank.
        keys += keys_of(collect(stream, num_workers=2, max_batches=4))
    assert sorted(keys) == [f"{i:07d}" for i in range(24)]


def test_train_is_deterministic_and_resume_equals_tail(tmp_path):
    out, _, _ = idx_shards(tmp_path, count=40, shard_size=10)  # 4 shards, 2 per worker: 5 batches per pass
    shards = expand_shards(out)

    def run(start_batch, num_batches, seed=0):
        stream = ShardStream(shards, mae_train_transform(16), batch_size=4, train=True, seed=seed,
                             shuffle_buffer=8, start_batch=start_batch)
        return collect(stream, num_workers=2, max_batches=num_batches)

    full = run(0, 14)  # 7 batches per worker: crosses into the second pass
    assert all(b["image"].shape == (4, 3, 16, 16) and b["image"].dtype == torch.float32 for b in full)
    assert len(set(keys_of(full[:10]))) == 40  # the first pass (5 batches per worker) covers every sample
    assert keys_of(full[10:]) != keys_of(full[:4])  # pass 1 reads in a different order

    again = run(0, 14)
    assert keys_of(again) == keys_of(full)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(again, full))
    assert keys_of(run(0, 14, seed=1)) != keys_of(full)

    resumed = run(3, 11)
    for expected, got in zip(full[3:], resumed, strict=True):
        assert got["key"] == expected["key"]
        assert torch.equal(got["label"], expected["label"])
        assert torch.equal(got["image"], expected["image"])


def test_main_process_stream_leaves_caller_rng_alone(tmp_path):
    out, _, _ = idx_shards(tmp_path, count=8, shard_size=8)
    stream = ShardStream(expand_shards(out), mae_train_transform(8), batch_size=4, train=True)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    # Iterate the stream itself: a DataLoader draws its own base seed from the global RNG.
    first = [batch for batch, _ in zip(stream, range(2))]
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(7)  # the caller's RNG state does not change the augmentations
    second = [batch for batch, _ in zip(stream, range(2))]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, second))

    def fail_on_the_third(image):  # an error while a batch is being prepared: the caller's RNG is still given back
        fail_on_the_third.calls += 1
        if fail_on_the_third.calls == 3:
            raise RuntimeError("a bug in a transform")
        return transform(image)

    transform, fail_on_the_third.calls = mae_train_transform(8), 0
    failing = ShardStream(expand_shards(out), fail_on_the_third, batch_size=4, train=True)
    torch.manual_seed(9)
    state = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="a bug in a transform"):
        next(iter(failing))
    assert torch.equal(torch.get_rng_state(), state)


def test_stream_skips_truncated_tar_and_bad_samples(tmp_path):
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, format="PNG")
    big_png = buffer.getvalue()
    with ShardWriter(tmp_path, max_samples=4) as writer:
        for i in range(12):
            sample = {"__key__": f"{i:03d}", "png": big_png, "cls": b"1"}
            if i == 5:
                sample["png"] = b"garbage, not a png"
            if i == 6:
                del sample["cls"]
            writer.write(sample)
    # Cut the first shard in the middle of its third sample's image: its first two samples are still read.
    first = tmp_path / "train-000000.tar"
    with tarfile.open(first) as tar:
        third_image = [m for m in tar.getmembers() if m.name == "002.png"][0]
    first.write_bytes(first.read_bytes()[: third_image.offset_data + third_image.size // 2])

    stream = ShardStream(expand_shards(tmp_path), as_uint8_tensor(), batch_size=3, train=False)
    batches = collect(stream, num_workers=0)
    assert keys_of(batches) == ["000", "001", "004", "007", "008", "009", "010", "011"]
    assert total_skipped(batches) == {"bad_tar": 1, "undecodable_image": 1, "missing_field": 1}
    assert torch.cat([b["label"] for b in batches]).eq(1).all()

    # 3 shards < 4 slots: every slot reads every shard, yet each sample and the bad tar are counted once.
    spread = []
    for rank in range(2):
        stream = ShardStream(expand_shards(tmp_path), as_uint8_tensor(), batch_size=2, train=False, rank=rank,
                             world_size=2)
        spread += collect(stream, num_workers=2)
    assert sorted(keys_of(spread)) == keys_of(batches)
    assert total_skipped(spread) == {"bad_tar": 1, "undecodable_image": 1, "missing_field": 1}

    # Training goes on through the bad data too, pass after pass.
    train_stream = ShardStream(expand_shards(tmp_path), as_uint8_tensor(), batch_size=4, train=True)
    train_batches = collect(train_stream, num_workers=0, max_batches=6)  # 24 samples = 3 passes of 8
    assert total_skipped(train_batches).get("bad_tar", 0) >= 2


def test_stream_rejects_resume_in_eval_and_empty_slots_in_training(tmp_path):
    out, _, _ = idx_shards(tmp_path, count=2, shard_size=10)
    with pytest.raises(ValueError, match="start_batch"):
        ShardStream(expand_shards(out), as_uint8_tensor(), 2, train=False, start_batch=1)
    stream = ShardStream(expand_shards(out), as_uint8_tensor(), 1, train=True, rank=2, world_size=3)
    with pytest.raises(DataError, match=r"1 shard\(s\) .* for 3 reading slots"):
        next(iter(stream))


# ------------------------------------------------------------------------------------------------ embedded data


def test_ensure_embedded_shards_writes_2700_train_and_300_val(tmp_path):
    train_dir, val_dir = ensure_embedded_shards(tmp_path / "cache")
    assert (count_samples(train_dir), count_samples(val_dir)) == (2700, 300)
    stats = json.loads((Path(train_dir) / "stats.json").read_text())
    assert stats["classes"] == list(FASHION_MNIST_CLASSES) and stats["skipped"] == {}
    assert len(stats["shards"]) == 6  # 2700 / 500

    stats_time = (Path(val_dir) / "stats.json").stat().st_mtime_ns
    assert ensure_embedded_shards(tmp_path / "cache") == (train_dir, val_dir)
    assert (Path(val_dir) / "stats.json").stat().st_mtime_ns == stats_time  # second call wrote nothing

    batch = next(iter(ShardStream(expand_shards(val_dir), eval_transform(32), batch_size=8, train=False)))
    assert batch["image"].shape == (8, 3, 32, 32) and batch["label"].dtype == torch.long
    assert 0 <= batch["label"].min() and batch["label"].max() < 10
