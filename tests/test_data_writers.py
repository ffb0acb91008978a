"""Tests of the image-text and detection shard writers, and of the options every writer shares (re-encoding,
workers, sizes.json/shards.txt, strict, interruption), on tiny images made here."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from data import (
    DataError,
    ImageOptions,
    ShardOptions,
    WrittenShards,
    coco_ground_truth,
    decode_detection,
    decode_pair,
    expand_shards,
    read_coco,
    read_image_folder,
    read_pair_folder,
    read_pair_manifest,
    read_categories,
    read_class_names,
    write_detection_shards,
    write_labelled_shards,
    write_pair_shards,
)
from data.__main__ import main as data_cli
from data.images import decode_image

# ------------------------------------------------------------------------------------------------ helpers


def save_image(path: Path, size=(12, 8), seed: int = 0, fmt: str | None = None) -> bytes:
    """Write a noise image of size (width, height) to `path`; returns the file's bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, format=fmt)
    return path.read_bytes()


def read_samples(shard_dir: Path) -> list[dict]:
    """Every raw sample, through a plain webdataset pipeline over the directory's shards.txt."""
    return list(wds.WebDataset(expand_shards(shard_dir / "shards.txt"), shardshuffle=False))


def stats_of(shard_dir: Path) -> dict:
    return json.loads((shard_dir / "stats.json").read_text())


def tar_bytes(shard_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(shard_dir.glob("*.tar"))}


def image_of(sample: dict) -> Image.Image:
    image, _ = decode_detection(sample) if "json" in sample else decode_pair(sample)
    return image


CAPTIONS = ["a red fox", "zwei Katzen auf dem Sofa ☕", "one more caption here"]


def pair_files(root: Path) -> list[tuple[str, bytes]]:
    """Three images under root/img (PNG, JPEG, PNG); returns (relative path, bytes) for each."""
    files = [("img/a.png", None), ("img/b.jpg", "JPEG"), ("img/sub/c.png", None)]
    return [(name, save_image(root / name, seed=i, fmt=fmt)) for i, (name, fmt) in enumerate(files)]


# ------------------------------------------------------------------------------------------------ image-text pairs


@pytest.mark.parametrize("manifest_name", ["pairs.csv", "pairs.tsv", "pairs.jsonl"])
def test_pair_manifest_round_trip(tmp_path, manifest_name):
    files = pair_files(tmp_path)
    paths = [files[0][0], files[1][0], str(tmp_path / files[2][0])]  # relative and absolute paths
    manifest = tmp_path / manifest_name
    if manifest_name.endswith(".csv"):
        manifest.write_text("path,caption\n" + "".join(f'{p},"{c}"\n' for p, c in zip(paths, CAPTIONS)),
                            encoding="utf-8")
    elif manifest_name.endswith(".tsv"):  # the alternative column names
        manifest.write_text("text\timage\n" + "".join(f"{c}\t{p}\n" for p, c in zip(paths, CAPTIONS)),
                            encoding="utf-8")
    else:
        manifest.write_text("".join(json.dumps({"image": p, "text": c}) + "\n" for p, c in zip(paths, CAPTIONS)),
                            encoding="utf-8")

    pairs = read_pair_manifest(manifest)
    assert len(pairs) == 3
    [written] = write_pair_shards(pairs, tmp_path / "out", options=ShardOptions(shard_size=2, progress=False))
    out, stats = written.directory, written.stats
    assert out == tmp_path / "out"
    assert stats["samples"] == 3 and stats["skipped"] == {}
    assert stats["shards"] == ["train-000000.tar", "train-000001.tar"]
    assert json.loads((out / "sizes.json").read_text()) == {"train-000000.tar": 2, "train-000001.tar": 1}
    assert (out / "shards.txt").read_text() == "train-000000.tar\ntrain-000001.tar\n"
    words = [len(c.split()) for c in CAPTIONS]
    assert stats["caption_words"] == {"min": min(words), "mean": round(sum(words) / 3, 3), "max": max(words)}
    assert stats["caption_chars"]["max"] == max(len(c) for c in CAPTIONS)
    assert stats_of(out) == stats

    samples = read_samples(out)
    assert [s["__key__"] for s in samples[:2]] == ["0000000-img_a", "0000001-img_b"]
    assert samples[2]["__key__"].startswith("0000002-") and samples[2]["__key__"].endswith("img_sub_c")
    for sample, (name, original), caption in zip(samples, files, CAPTIONS, strict=True):
        ext = "jpg" if name.endswith(".jpg") else "png"
        assert {field for field in sample if not field.startswith("__")} == {ext, "txt"}
        assert sample[ext] == original  # the original bytes, not re-encoded
        assert sample["txt"].decode("utf-8") == caption
        image, text = decode_pair(sample)
        assert text == caption and image.mode == "RGB" and image.size == (12, 8)


def test_pair_folder_round_trip_and_missing_caption(tmp_path):
    root = tmp_path / "downloaded"
    shard_a = [save_image(root / "00000" / f"00000000{i}.jpg", seed=i, fmt="JPEG") for i in range(2)]
    (root / "00000" / "000000000.txt").write_text(CAPTIONS[0], encoding="utf-8")
    (root / "00000" / "000000001.txt").write_text("   \n", encoding="utf-8")  # empty after stripping
    (root / "00000" / "000000000.json").write_text('{"url": "ignored"}')
    webp = save_image(root / "00001" / "000010000.webp", seed=5, fmt="WEBP")
    (root / "00001" / "000010000.txt").write_text(CAPTIONS[1] + "\n", encoding="utf-8")
    save_image(root / "00001" / "000010001.png", seed=6)  # no caption file at all

    pairs = read_pair_folder(root)
    assert len(pairs) == 4
    [written] = write_pair_shards(pairs, tmp_path / "out", options=ShardOptions(progress=False))
    stats = written.stats
    assert stats["samples"] == 2 and stats["skipped"] == {"missing_caption": 2}
    assert [e["source"].rsplit("/", 1)[-1] for e in stats["skipped_examples"]] == ["000000001.jpg",
                                                                                   "000010001.png"]
    assert "no caption file 000010001.txt" in stats["skipped_examples"][1]["message"]
    samples = read_samples(tmp_path / "out")
    assert [s["__key__"] for s in samples] == ["0000000-00000_000000000", "0000002-00001_000010000"]
    assert samples[0]["jpg"] == shard_a[0] and samples[1]["webp"] == webp
    assert [decode_pair(s)[1] for s in samples] == CAPTIONS[:2]  # trailing newline stripped

    with pytest.raises(DataError, match="no image files"):
        read_pair_folder(tmp_path / "out")


def test_pairs_bad_rows_are_skipped_and_counted_or_raise_when_strict(tmp_path):
    save_image(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    save_image(tmp_path / "no_caption.png", seed=1)
    manifest = tmp_path / "pairs.csv"
    manifest.write_text("path,caption\ngood.png,fine\nbroken.png,bad pixels\nmissing.png,gone\nno_caption.png,\n")
    [written] = write_pair_shards(read_pair_manifest(manifest), tmp_path / "out", options=ShardOptions(progress=False))
    stats = written.stats
    assert stats["samples"] == 1
    assert stats["skipped"] == {"undecodable_image": 1, "unreadable_file": 1, "missing_caption": 1}
    sources = [e["source"] for e in stats["skipped_examples"]]
    assert "broken.png (" in sources[0] and "pairs.csv:3" in sources[0]
    assert "pairs.csv:4" in sources[1] and "pairs.csv:5" in sources[2]
    assert stats_of(tmp_path / "out")["skipped"] == stats["skipped"]

    with pytest.raises(DataError, match=r"broken\.png \(.*pairs\.csv:3\): undecodable image"):
        write_pair_shards(read_pair_manifest(manifest), tmp_path / "strict",
                          options=ShardOptions(strict=True, progress=False))
    assert list((tmp_path / "strict").iterdir()) == []  # nothing left behind, not even a temporary file


@pytest.mark.parametrize("name, text, message", [
    ("no_caption.csv", "path,label\na.png,1\n", r"no_caption\.csv:1: header .*missing caption"),
    ("no_path.tsv", "file\ttext\na.png\thi\n", r"no_path\.tsv:1: header .*missing path"),
    ("no_caption.jsonl", '{"path": "a.png", "caption": "x"}\n{"path": "b.png"}\n',
     r'no_caption\.jsonl:2: expected an object with "path" \(or "image"\) and "caption"'),
    ("number.jsonl", '{"image": "a.png", "text": 3}\n', r"number\.jsonl:1: caption must be a string"),
])
def test_pair_manifest_missing_column_names_file_and_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=message):
        read_pair_manifest(tmp_path / name)


# ------------------------------------------------------------------------------------------------ detection


CATEGORIES = [{"id": 1, "name": "cat", "supercategory": "animal"}, {"id": 7, "name": "dog"}]


def coco_data(root: Path) -> tuple[Path, Path, dict]:
    """A COCO file with 4 images (one file missing, one without annotations) and 6 annotations, of which
    one sticks out of its image and one has no width. Returns (annotation file, image folder, the valid part)."""
    images_dir = root / "images"
    save_image(images_dir / "a.png", size=(40, 20), seed=1)
    save_image(images_dir / "nested" / "b.jpg", size=(30, 30), seed=2, fmt="JPEG")
    save_image(images_dir / "c.png", size=(16, 24), seed=3)
    images = [
        {"id": 10, "file_name": "a.png", "width": 40, "height": 20},
        {"id": 11, "file_name": "nested/b.jpg", "width": 30, "height": 30},
        {"id": 12, "file_name": "c.png", "width": 16, "height": 24},  # no annotations: kept, empty lists
        {"id": 13, "file_name": "gone.png", "width": 8, "height": 8},  # no such file: skipped
    ]
    annotations = [
        {"id": 100, "image_id": 10, "category_id": 1, "bbox": [4, 2, 10, 6], "area": 50.5, "iscrowd": 0},
        {"id": 101, "image_id": 10, "category_id": 7, "bbox": [30.5, 0, 10.2, 20.6], "area": 200.0, "iscrowd": 1},
        {"id": 102, "image_id": 10, "category_id": 7, "bbox": [35, 5, 10, 5], "area": 50.0, "iscrowd": 0},  # out
        {"id": 103, "image_id": 11, "category_id": 1, "bbox": [0, 0, 30, 30], "area": 900.0, "iscrowd": 0},
        {"id": 104, "image_id": 11, "category_id": 7, "bbox": [3, 3, 0, 4], "area": 0.0, "iscrowd": 0},  # degenerate
        {"id": 105, "image_id": 13, "category_id": 1, "bbox": [1, 1, 2, 2], "area": 4.0, "iscrowd": 0},
    ]
    annotation_file = root / "instances.json"
    annotation_file.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    valid = {"images": images[:3], "annotations": [a for a in annotations if a["id"] in (100, 101, 103)],
             "categories": CATEGORIES}
    return annotation_file, images_dir, valid


def test_detection_round_trip_counts_bad_boxes_and_rebuilds_ground_truth(tmp_path):
    annotation_file, images_dir, valid = coco_data(tmp_path)
    categories, images = read_coco(annotation_file, images_dir)
    assert categories == CATEGORIES and len(images) == 4
    out = tmp_path / "out"
    [written] = write_detection_shards(images, out, categories, options=ShardOptions(shard_size=2, progress=False))
    stats = written.stats
    assert stats["samples"] == 3 and stats["shards"] == ["train-000000.tar", "train-000001.tar"]
    assert stats["skipped"] == {"unreadable_file": 1} and "gone.png" in stats["skipped_examples"][0]["source"]
    assert stats["dropped"] == {"box_outside_image": 1, "degenerate_box": 1}
    assert [e["message"].split(":")[0] for e in stats["dropped_examples"]] == ["annotation 102", "annotation 104"]
    assert stats["categories"] == CATEGORIES and read_categories(out) == CATEGORIES
    assert (stats["boxes"], stats["box_counts"], stats["images_without_boxes"]) == (3, {"cat": 2, "dog": 1}, 1)

    samples = read_samples(out)
    assert [s["__key__"] for s in samples] == ["0000000-a", "0000001-nested_b", "0000002-c"]
    assert samples[0]["png"] == (images_dir / "a.png").read_bytes()
    assert samples[1]["jpg"] == (images_dir / "nested" / "b.jpg").read_bytes()
    image, target = decode_detection(samples[0])
    assert image.size == (40, 20) and image.mode == "RGB"
    assert target == {"image_id": 10, "file_name": "a.png", "width": 40, "height": 20,
                      "boxes": [[4, 2, 10, 6], [30.5, 0, 10.2, 20.6]], "category_ids": [1, 7],
                      "annotation_ids": [100, 101], "iscrowd": [0, 1], "area": [50.5, 200.0]}
    assert decode_detection(samples[2])[1]["boxes"] == [] and decode_detection(samples[2])[1]["area"] == []

    assert coco_ground_truth(out) == valid

    with pytest.raises(DataError, match=r"a\.png \(image id 10 .*\): box outside image \(annotation 102:"):
        write_detection_shards(read_coco(annotation_file, images_dir).images, tmp_path / "strict", categories,
                               options=ShardOptions(strict=True, progress=False))


@pytest.mark.parametrize("change, message", [
    (lambda coco: coco["annotations"][0].pop("bbox"), r"annotations\[0\]: missing bbox"),
    (lambda coco: coco["annotations"][0].update(image_id=99), r"annotations\[0\] \(id 100\): unknown image_id 99"),
    (lambda coco: coco["annotations"][1].update(category_id=3), r"annotations\[1\] \(id 101\): unknown category"),
    (lambda coco: coco["images"][1].update(id=10), r"images\[1\]: duplicate image id 10"),
    (lambda coco: coco["annotations"][0].update(bbox=[1, 2, 3]),
     r"annotations\[0\] \(id 100\): bbox must be 4 numbers"),
])
def test_read_coco_rejects_malformed_entries_naming_them(tmp_path, change, message):
    annotation_file, images_dir, _ = coco_data(tmp_path)
    coco = json.loads(annotation_file.read_text())
    change(coco)
    annotation_file.write_text(json.dumps(coco))
    with pytest.raises(DataError, match=r"instances\.json: " + message):
        read_coco(annotation_file, images_dir)


# ------------------------------------------------------------------------------------------------ shared options


def test_resize_and_jpeg_reencoding_scale_boxes_and_sizes(tmp_path):
    annotation_file, images_dir, _ = coco_data(tmp_path)
    categories, images = read_coco(annotation_file, images_dir)
    shrunk = ShardOptions(image_options=ImageOptions(resize_shorter=10, jpeg_quality=80), progress=False)
    write_detection_shards(images, tmp_path / "out", categories, options=shrunk)
    samples = read_samples(tmp_path / "out")
    assert all(set(s) & {"png", "jpg"} == {"jpg"} for s in samples)  # every image re-encoded as JPEG
    sizes = [decode_detection(s)[0].size for s in samples]
    assert sizes == [(20, 10), (10, 10), (10, 15)]  # shorter side 10, aspect kept
    a, b = (decode_detection(s)[1] for s in samples[:2])
    assert (a["width"], a["height"], b["width"], b["height"]) == (20, 10, 10, 10)
    np.testing.assert_allclose(a["boxes"], [[2, 1, 5, 3], [15.25, 0, 5.1, 10.3]])  # 40x20 -> 20x10: scale 1/2
    np.testing.assert_allclose(a["area"], [50.5 / 4, 200.0 / 4])
    np.testing.assert_allclose(b["boxes"], [[0, 0, 10, 10]])  # 30x30 -> 10x10: scale 1/3

    ground_truth = coco_ground_truth(tmp_path / "out")
    assert [(i["width"], i["height"]) for i in ground_truth["images"]] == [(20, 10), (10, 10), (10, 15)]

    # Already small enough: size kept, still stored as JPEG of the asked quality; pairs and labels alike.
    save_image(tmp_path / "small" / "x" / "s.png", size=(6, 4))
    (tmp_path / "small" / "x" / "s.txt").write_text("tiny")
    write_pair_shards(read_pair_folder(tmp_path / "small"), tmp_path / "pairs",
                      options=ShardOptions(image_options=ImageOptions(resize_shorter=10), progress=False))
    (sample,) = read_samples(tmp_path / "pairs")
    assert decode_pair(sample)[0].size == (6, 4) and Image.open(io.BytesIO(sample["jpg"])).format == "JPEG"
    classes, labelled = read_image_folder(tmp_path / "small")
    write_labelled_shards(labelled, tmp_path / "labelled", classes,
                          options=ShardOptions(image_options=ImageOptions(jpeg_quality=50), progress=False))
    (sample,) = read_samples(tmp_path / "labelled")
    assert sample["cls"] == b"0" and Image.open(io.BytesIO(sample["jpg"])).size == (6, 4)


def test_workers_give_identical_shards(tmp_path):
    annotation_file, images_dir, _ = coco_data(tmp_path)
    for i in range(9):
        save_image(tmp_path / "pairs" / f"{i:04d}.png", size=(20 + i, 16), seed=i)
        (tmp_path / "pairs" / f"{i:04d}.txt").write_text(f"caption {i}" if i != 4 else "")
    (tmp_path / "pairs" / "0006.png").write_bytes(b"corrupt")
    image_options = ImageOptions(resize_shorter=8)
    for workers in (0, 2):
        categories, images = read_coco(annotation_file, images_dir)
        write_detection_shards(images, tmp_path / f"coco{workers}", categories,
                               options=ShardOptions(shard_size=2, workers=workers, image_options=image_options,
                                                    progress=False))
        [written] = write_pair_shards(read_pair_folder(tmp_path / "pairs"), tmp_path / f"pairs{workers}",
                                      options=ShardOptions(shard_size=3, workers=workers, image_options=image_options,
                                                           progress=False))
        assert written.stats["skipped"] == {"missing_caption": 1, "undecodable_image": 1}
    for kind in ("coco", "pairs"):
        serial, parallel = tar_bytes(tmp_path / f"{kind}0"), tar_bytes(tmp_path / f"{kind}2")
        assert len(serial) >= 2 and serial == parallel
        assert stats_of(tmp_path / f"{kind}0") == stats_of(tmp_path / f"{kind}2")


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_write_leaves_no_partial_shard(tmp_path, workers):
    for i in range(14):
        save_image(tmp_path / "pairs" / f"{i:04d}.png", seed=i)
        (tmp_path / "pairs" / f"{i:04d}.txt").write_text(f"caption {i}")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stats.json").write_text("{}")  # from an earlier run: must not survive a failed rewrite

    def failing_after_twelve():
        for index, pair in enumerate(read_pair_folder(tmp_path / "pairs")):
            if index == 12:
                raise KeyboardInterrupt
            yield pair

    with pytest.raises(KeyboardInterrupt):
        write_pair_shards(failing_after_twelve(), tmp_path / "out",
                          options=ShardOptions(shard_size=2, workers=workers, progress=False, overwrite=True))
    # Finished shards only (how many depends on how far the pool read ahead): no temp file, no stats.json.
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names[0] == "INCOMPLETE"  # and the marker of a directory never completed
    names = names[1:]
    assert len(names) >= 2 and names == [f"train-{i:06d}.tar" for i in range(len(names))]
    for name in names:
        assert len(list(wds.WebDataset(str(tmp_path / "out" / name), shardshuffle=False))) == 2


@pytest.mark.parametrize("settings, message", [
    (dict(shard_size=0), "shard_size must be >= 1, got 0"),
    (dict(workers=-1), "workers must be >= 0, got -1"),
])
def test_shard_options_reject_bad_values_naming_the_option(settings, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        ShardOptions(**settings)


def test_every_writer_returns_one_written_directory_or_train_and_val(tmp_path):
    annotation_file, images_dir, _ = coco_data(tmp_path)
    for i in range(10):
        save_image(tmp_path / "folder" / ("odd" if i % 2 else "even") / f"{i:04d}.png", seed=i)
        (tmp_path / "folder" / ("odd" if i % 2 else "even") / f"{i:04d}.txt").write_text(f"caption {i}")
    writers = {
        "labelled": lambda out, **split: write_labelled_shards(read_image_folder(tmp_path / "folder").samples, out,
                                                               ["even", "odd"], **split),
        "pairs": lambda out, **split: write_pair_shards(read_pair_folder(tmp_path / "folder"), out, **split),
        "detection": lambda out, **split: write_detection_shards(read_coco(annotation_file, images_dir).images, out,
                                                                 CATEGORIES, **split),
    }
    quiet = ShardOptions(progress=False)
    for kind, write in writers.items():
        whole = write(tmp_path / kind, options=quiet)
        assert [type(w) for w in whole] == [WrittenShards] and whole[0].directory == tmp_path / kind
        assert whole[0].stats == stats_of(tmp_path / kind)

        split = write(tmp_path / f"{kind}_split", val_fraction=0.5, seed=3, options=quiet)
        assert [type(w) for w in split] == [WrittenShards, WrittenShards]
        assert [w.directory for w in split] == [tmp_path / f"{kind}_split" / name for name in ("train", "val")]
        assert [w.stats for w in split] == [stats_of(w.directory) for w in split]
        assert sum(w.stats["samples"] for w in split) == whole[0].stats["samples"]
        assert split[1].stats["shards"] == ["val-000000.tar"]

    assert read_class_names(tmp_path / "labelled") == ["even", "odd"]
    assert read_categories(tmp_path / "detection_split" / "val") == CATEGORIES
    with pytest.raises(DataError, match=r"pairs holds image-text shards \(no cls field\), but this run reads "
                                        r"labelled samples"):
        read_class_names(tmp_path / "pairs")
    with pytest.raises(DataError, match=r"labelled/stats\.json lists no categories"):
        read_categories(tmp_path / "labelled")


# ------------------------------------------------------------------------------------------------ CLI


def test_cli_pairs_and_coco(tmp_path, capsys):
    files = pair_files(tmp_path)
    manifest = tmp_path / "pairs.jsonl"
    rows = [{"path": name, "caption": f"caption {i}"} for i, (name, _) in enumerate(files * 4)]  # 12 rows
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code = data_cli(["pairs", "--manifest", str(manifest), "--out", str(tmp_path / "split"), "--val-fraction",
                     "0.25", "--shard-size", "4", "--workers", "2", "--no-progress"])
    assert code == 0
    train, val = stats_of(tmp_path / "split" / "train"), stats_of(tmp_path / "split" / "val")
    assert (train["samples"], val["samples"]) == (9, 3) and train["kind"] == "image-text"
    assert json.loads((tmp_path / "split" / "val" / "sizes.json").read_text()) == {"val-000000.tar": 3}
    keys = [{s["__key__"] for s in read_samples(tmp_path / "split" / d)} for d in ("train", "val")]
    assert not keys[0] & keys[1] and len(keys[0] | keys[1]) == 12
    assert "9 samples in 3 shard(s), captions of 2.0 words" in capsys.readouterr().out

    (tmp_path / "img" / "a.txt").write_text("caption for a")
    assert data_cli(["pairs", "--folder", str(tmp_path / "img"), "--out", str(tmp_path / "folder"),
                     "--jpeg-quality", "70", "--no-progress"]) == 0
    assert stats_of(tmp_path / "folder")["skipped"] == {"missing_caption": 2}

    annotation_file, images_dir, _ = coco_data(tmp_path)
    code = data_cli(["coco", "--annotations", str(annotation_file), "--images", str(images_dir), "--out",
                     str(tmp_path / "coco"), "--resize-shorter", "10", "--no-progress"])
    assert code == 0
    assert coco_ground_truth(tmp_path / "coco")["images"][0] == {"id": 10, "file_name": "a.png", "width": 20,
                                                                 "height": 10}
    output = capsys.readouterr().out
    assert "3 samples in 1 shard(s), 3 boxes in 2 categories" in output
    assert "dropped box_outside_image=1, dropped degenerate_box=1" in output

    code = data_cli(["coco", "--annotations", str(annotation_file), "--images", str(images_dir), "--out",
                     str(tmp_path / "strict"), "--strict", "--no-progress"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and error.startswith("error: ") and "a.png" in error and "box outside image" in error
    assert data_cli(["pairs", "--folder", str(tmp_path / "img"), "--out", str(tmp_path / "x"),
                     "--jpeg-quality", "101"]) == 2


def test_detection_image_of_another_size_than_annotated_is_skipped(tmp_path):
    save_image(tmp_path / "images" / "a.png", size=(10, 10))
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 10}],
            "annotations": [{"id": 5, "image_id": 1, "category_id": 1, "bbox": [12, 0, 6, 6]}],
            "categories": [{"id": 1, "name": "cat"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    categories, images = read_coco(tmp_path / "coco.json", tmp_path / "images")
    with pytest.warns(UserWarning, match="no valid samples"):
        [written] = write_detection_shards(images, tmp_path / "out", categories, options=ShardOptions(progress=False))
    stats = written.stats
    assert stats["skipped"] == {"size_mismatch": 1} and stats["samples"] == 0
    assert "says 20x10, image is 10x10" in stats["skipped_examples"][0]["message"]
    assert coco_ground_truth(tmp_path / "out") == {"images": [], "annotations": [], "categories": categories}


# ------------------------------------------------------------------------------------------------ pixel statistics


def test_every_writer_records_the_normalisation_statistics_of_the_images_it_wrote(tmp_path, capsys):
    """stats.json's pixel_mean / pixel_std: per channel, over every written image as readers decode it (each image
    counting once); what `data.mean` / `data.std` are set to for training on these images from scratch."""
    annotation_file, images_dir, _ = coco_data(tmp_path)
    for i in range(6):
        save_image(tmp_path / "folder" / "x" / f"{i:04d}.png", size=(12 + 4 * i, 8), seed=10 + i)  # sizes differ
        (tmp_path / "folder" / "x" / f"{i:04d}.txt").write_text(f"caption {i}")
    quiet = ShardOptions(progress=False)
    written = {
        "labelled": write_labelled_shards(read_image_folder(tmp_path / "folder").samples, tmp_path / "labelled",
                                          ["x"], options=quiet)[0],
        "pairs": write_pair_shards(read_pair_folder(tmp_path / "folder"), tmp_path / "pairs", options=quiet)[0],
        "detection": write_detection_shards(read_coco(annotation_file, images_dir).images, tmp_path / "detection",
                                            CATEGORIES, options=quiet)[0],
    }
    for kind, shards in written.items():
        images = [np.asarray(decode_image(sample), dtype=np.float64) / 255 for sample in read_samples(shards.directory)]
        mean = np.mean([image.reshape(-1, 3).mean(axis=0) for image in images], axis=0)
        mean_square = np.mean([(image.reshape(-1, 3) ** 2).mean(axis=0) for image in images], axis=0)
        stats = stats_of(shards.directory)
        np.testing.assert_allclose(stats["pixel_mean"], mean, atol=1e-4, err_msg=kind)
        np.testing.assert_allclose(stats["pixel_std"], np.sqrt(mean_square - mean ** 2), atol=1e-4, err_msg=kind)
        assert 0.4 < min(stats["pixel_mean"]) and max(stats["pixel_mean"]) < 0.6  # uniform noise: ~0.5, std ~0.29

    # Grey images give the same figure in every channel, and the CLI prints them beside the counts.
    grey = tmp_path / "grey"
    for i, value in enumerate((0, 51, 255)):
        grey.joinpath("g").mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), value).save(grey / "g" / f"{i}.png")
    assert data_cli(["folder", "--root", str(grey), "--out", str(tmp_path / "grey_shards"), "--no-progress"]) == 0
    mean, std = (0 + 0.2 + 1) / 3, np.sqrt((0 + 0.04 + 1) / 3 - ((0 + 0.2 + 1) / 3) ** 2)
    stats = stats_of(tmp_path / "grey_shards")
    np.testing.assert_allclose(stats["pixel_mean"], [mean] * 3, atol=1e-4)
    np.testing.assert_allclose(stats["pixel_std"], [std] * 3, atol=1e-4)
    assert f"pixel mean {stats['pixel_mean']} std {stats['pixel_std']}" in capsys.readouterr().out


def test_large_images_are_measured_on_a_reduced_copy_with_the_same_statistics():
    from data.images import PIXEL_STATS_SIDE, pixel_moments

    pixels = np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    mean, mean_square = pixel_moments(image)
    exact = pixels.reshape(-1, 3).astype(np.float64) / 255
    np.testing.assert_allclose(mean, exact.mean(axis=0), atol=2e-3)  # a box filter keeps the mean
    assert image.size == (500, 300) and PIXEL_STATS_SIDE < 300  # the caller's image is left as it was
    assert all(m * m <= s <= m for m, s in zip(mean, mean_square))
