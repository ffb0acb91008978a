"""Bad input to `python -m data` never hangs, never ends in a traceback and never changes data silently: each fault
gives one `error:` line and exit status 2, or a counted skip when it is one bad sample among good ones. Also: 16-bit
images keep their tones, an output directory is never replaced unasked, and an unfinished one is marked INCOMPLETE.
Everything runs through the CLI's `main(argv)` (and once as a real, killed subprocess) on tiny data made here."""

import gzip
import io
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

import data.__main__
import data.samples
import data.writer
from data import ShardOptions, ensure_embedded_shards, read_image_folder, write_labelled_shards
from data.__main__ import main as data_cli
from data.errors import DataError
from data.images import decode_image
from data.samples import open_image

REPO = Path(__file__).resolve().parents[1]

# ------------------------------------------------------------------------------------------------ helpers


def save_image(path: Path, size=(8, 6), seed: int = 0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def write_idx(directory: Path, count: int, size: int = 4) -> tuple[Path, Path]:
    """A gzipped MNIST-style IDX pair of `count` noise images, labelled 0, 1, 0, 1, ..."""
    labels = np.arange(count) % 2
    pixels = np.random.default_rng(0).integers(0, 256, (count, size, size), dtype=np.uint8)
    directory.mkdir(parents=True, exist_ok=True)
    images, label_file = directory / "images.gz", directory / "labels.gz"
    images.write_bytes(gzip.compress(struct.pack(">IIII", 2051, count, size, size) + pixels.tobytes()))
    label_file.write_bytes(gzip.compress(struct.pack(">II", 2049, count) + labels.astype(np.uint8).tobytes()))
    return images, label_file


def cli(capsys, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `python -m data ARGV --no-progress`."""
    code = data_cli([str(a) for a in argv] + ["--no-progress"])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code: int, err: str, *fragments: str) -> None:
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


def stats_of(directory: Path) -> dict:
    return json.loads((directory / "stats.json").read_text())


def png_8bit(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def png_16bit(pixels: np.ndarray) -> bytes:
    """A 16-bit PNG of uint16 pixels [H, W] (grey) or [H, W, 3] (RGB), written by hand: PIL writes no 16-bit RGB."""
    height, width = pixels.shape[:2]
    colour_type = 2 if pixels.ndim == 3 else 0
    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


# ------------------------------------------------------------------------------------------------ 16-bit images

RAMP = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))  # [8, 256], 0..65535 left to right
RAMP_8BIT = (RAMP >> 8).astype(np.uint8)  # the documented scaling: keep the high byte


def _encoded_ramp(kind: str) -> tuple[bytes, str]:
    """The ramp as an encoded 16-bit file: (bytes, extension). PGM opens in PIL as mode I, PNG/TIFF as I;16."""
    if kind == "png-grey":
        return png_16bit(RAMP), "png"
    if kind == "png-rgb":
        return png_16bit(np.stack([RAMP, RAMP, RAMP], axis=-1)), "png"
    if kind == "pgm":
        return b"P5 256 8 65535\n" + RAMP.astype(">u2").tobytes(), "pgm"
    buffer = io.BytesIO()
    Image.fromarray(RAMP).save(buffer, format="TIFF")
    return buffer.getvalue(), "tif"


SIXTEEN_BIT_KINDS = ["png-grey", "png-rgb", "pgm", "tiff"]


@pytest.mark.parametrize("kind", SIXTEEN_BIT_KINDS)
@pytest.mark.parametrize("decoder", ["torchvision", "pil"])
def test_sixteen_bit_image_reads_as_its_8bit_ramp(kind, decoder, monkeypatch):
    encoded, ext = _encoded_ramp(kind)
    if decoder == "pil":  # as once torchvision drops its decoders
        monkeypatch.setattr(data.samples, "decode_image", None)
    image, size = open_image(encoded)
    assert image.dtype == torch.uint8 and size == (256, 8)
    for channel in image.numpy():
        assert np.abs(channel.astype(int) - RAMP_8BIT).max() <= 1  # was 255 (white) beyond the first pixel
    pil_rgb = np.asarray(decode_image({"__key__": "ramp", ext: encoded}))  # data.decode_pair / decode_detection
    assert np.abs(pil_rgb[..., 0].astype(int) - RAMP_8BIT).max() <= 1


@pytest.mark.parametrize("kind", SIXTEEN_BIT_KINDS)
@pytest.mark.parametrize("reencode", [["--jpeg-quality", "95"], ["--resize-shorter", "4", "--jpeg-quality", "95"]])
def test_sixteen_bit_image_reencoded_by_the_cli_keeps_its_ramp(tmp_path, capsys, kind, reencode):
    encoded, ext = _encoded_ramp(kind)
    (tmp_path / "root" / "ramp").mkdir(parents=True)
    (tmp_path / "root" / "ramp" / f"r.{ext}").write_bytes(encoded)
    (tmp_path / "root" / "ramp" / "r8.png").write_bytes(png_8bit(RAMP_8BIT))  # the 8-bit reference, same path
    code, _, err = cli(capsys, "folder", "--root", tmp_path / "root", "--out", tmp_path / "out", *reencode)
    assert code == 0, err
    samples = list(wds.WebDataset(str(tmp_path / "out" / "train-000000.tar"), shardshuffle=False))
    written, reference = (np.asarray(Image.open(io.BytesIO(s["jpg"])).convert("L")).astype(int) for s in samples)
    assert written.shape == reference.shape == ((8, 256) if len(reencode) == 2 else (4, 128))
    assert np.abs(written - reference).max() <= 1 and abs(written.mean() - RAMP_8BIT.mean()) < 2


# ------------------------------------------------------------------------------------------------ --overwrite


def test_cli_refuses_an_output_directory_that_holds_files(tmp_path, capsys):
    images, labels = write_idx(tmp_path / "idx", 6)
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "train-000000.tar").write_bytes(b"someone else's shard")
    for kind in (["idx", "--images", images, "--labels", labels], ["embedded"]):
        code, _, err = cli(capsys, *kind, "--out", out)
        assert_one_error_line(code, err, str(out), "already holds 2 file(s)", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "train-000000.tar"]
    assert (out / "train-000000.tar").read_bytes() == b"someone else's shard"


def test_cli_overwrite_replaces_only_what_a_writer_wrote(tmp_path, capsys):
    images, labels = write_idx(tmp_path / "idx", 6)
    out = tmp_path / "out"
    assert cli(capsys, "idx", "--images", images, "--labels", labels, "--out", out, "--shard-size", "2")[0] == 0
    foreign = {"notes.txt": b"keep", "other.tar": b"not ours", "train-1.tar": b"not our pattern",
               ".train-000009.tar.partial": b"nor this"}
    for name, content in foreign.items():
        (out / name).write_bytes(content)
    (out / ".train-000003.tar.tmp-12345").write_bytes(b"a temporary shard of a killed run")

    code, out_text, err = cli(capsys, "idx", "--images", images, "--labels", labels, "--out", out, "--overwrite")
    assert code == 0, err
    assert "6 samples in 1 shard(s)" in out_text
    assert "note:" in err and "other.tar" in err and "train-1.tar" in err  # kept, and read with the directory
    ours = ["shards.txt", "sizes.json", "stats.json", "train-000000.tar"]
    assert sorted(p.name for p in out.iterdir()) == sorted(ours + list(foreign))  # old shards 1 and 2 are gone
    assert all((out / name).read_bytes() == content for name, content in foreign.items())
    assert stats_of(out)["shards"] == ["train-000000.tar"]

    # A split run over the unsplit one: the old top-level shards and index files go, the foreign files stay.
    code, _, err = cli(capsys, "idx", "--images", images, "--labels", labels, "--out", out, "--overwrite",
                       "--val-fraction", "0.5")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted(["train", "val", *foreign])
    assert [stats_of(out / split)["samples"] for split in ("train", "val")] == [3, 3]


def test_library_writers_refuse_a_full_directory_unless_overwrite(tmp_path):
    save_image(tmp_path / "root" / "a" / "x.png")
    classes, samples = read_image_folder(tmp_path / "root")
    out = tmp_path / "out"
    out.mkdir()
    (out / "stats.json").write_text("{}")  # an earlier run's, say
    with pytest.raises(DataError, match=r"out already holds 1 file\(s\) \(stats\.json\); pass --overwrite"):
        write_labelled_shards(samples, out, classes, options=ShardOptions(progress=False))
    assert (out / "stats.json").read_text() == "{}"
    [written] = write_labelled_shards(samples, out, classes, options=ShardOptions(progress=False, overwrite=True))
    assert written.stats["samples"] == 1 and stats_of(out) == written.stats


# ------------------------------------------------------------------------------------------------ INCOMPLETE


def test_sigkilled_cli_leaves_the_incomplete_marker_and_a_finished_one_none(tmp_path, capsys):
    images, labels = write_idx(tmp_path / "idx", 20000, size=1)  # one shard per image: minutes of work
    killed = tmp_path / "killed"
    command = [sys.executable, "-m", "data", "idx", "--images", images, "--labels", labels, "--out", killed,
               "--shard-size", "1", "--no-progress"]
    process = subprocess.Popen([str(a) for a in command], cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "train-000002.tar").exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        _, err = process.communicate()
    assert process.returncode == -signal.SIGKILL, err
    marker = (killed / "INCOMPLETE").read_text()
    assert len(marker.splitlines()) == 1 and "python -m data idx" in marker and "incomplete" in marker
    assert not (killed / "stats.json").exists()
    shards = sorted(killed.glob("train-*.tar"))
    assert len(shards) >= 3 and all(len(tarfile.open(shard).getnames()) == 2 for shard in shards)  # png + cls

    small_images, small_labels = write_idx(tmp_path / "small", 6)
    code, _, err = cli(capsys, "idx", "--images", small_images, "--labels", small_labels, "--out", tmp_path / "done",
                       "--val-fraction", "0.5")
    assert code == 0, err
    assert [list((tmp_path / "done" / split).glob("INCOMPLETE")) for split in ("train", "val")] == [[], []]


def test_failed_write_keeps_the_marker_with_its_shards_and_none_without(tmp_path, capsys):
    root = tmp_path / "root"
    for index in range(3):
        save_image(root / "a" / f"{index}.png", seed=index)
    (root / "a" / "3.png").write_bytes(b"broken")  # sorted last: the --strict failure comes after 3 good images
    code, _, err = cli(capsys, "folder", "--root", root, "--out", tmp_path / "late", "--strict", "--shard-size", "2")
    assert_one_error_line(code, err, "3.png", "undecodable image")
    assert sorted(p.name for p in (tmp_path / "late").iterdir()) == ["INCOMPLETE", "train-000000.tar"]

    (root / "a" / "0.png").write_bytes(b"broken too")  # now the first image fails: nothing was written
    code, _, err = cli(capsys, "folder", "--root", root, "--out", tmp_path / "early", "--strict")
    assert_one_error_line(code, err, "0.png", "undecodable image")
    assert list((tmp_path / "early").iterdir()) == []


def test_ctrl_c_is_one_line_and_leaves_the_marker(tmp_path, capsys, monkeypatch):
    images, labels = write_idx(tmp_path / "idx", 8)
    original = data.__main__.read_idx

    def interrupted_after_four(*args, **kwargs):
        class_names, samples = original(*args, **kwargs)

        def items():
            for index, sample in enumerate(samples):
                if index == 4:
                    raise KeyboardInterrupt
                yield sample
        return class_names, items()

    monkeypatch.setattr(data.__main__, "read_idx", interrupted_after_four)
    code, _, err = cli(capsys, "idx", "--images", images, "--labels", labels, "--out", tmp_path / "out",
                       "--shard-size", "2")
    assert code == 130 and err.strip().startswith("error: interrupted") and len(err.strip().splitlines()) == 1
    # shard 0 (samples 0, 1) was finished; shard 1 (samples 2, 3) was still open and is dropped
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["INCOMPLETE", "train-000000.tar"]


def test_embedded_cache_is_rewritten_when_a_run_left_it_incomplete(tmp_path):
    train, val = map(Path, ensure_embedded_shards(tmp_path / "cache", shard_size=3000))
    (val / "INCOMPLETE").write_text("killed after stats.json, before the marker went")
    (val / "val-000000.tar").write_bytes(b"cut short")
    assert ensure_embedded_shards(tmp_path / "cache", shard_size=3000) == (str(train), str(val))
    assert not (val / "INCOMPLETE").exists() and stats_of(val)["samples"] == 300
    assert len(list(wds.WebDataset(str(val / "val-000000.tar"), shardshuffle=False))) == 300


def test_a_failing_disk_is_one_error_line(tmp_path, capsys, monkeypatch):
    def full_disk(self, sample):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data.writer.ShardWriter, "write", full_disk)
    code, _, err = cli(capsys, *_idx(tmp_path), "--out", tmp_path / "out")
    assert_one_error_line(code, err, "out: cannot write the shards ([Errno 28] No space left on device)")
    assert list((tmp_path / "out").iterdir()) == []  # no shard was finished: no marker either


# ------------------------------------------------------------------------------------------------ writing nothing


def _all_bad_folder(tmp_path: Path) -> list:
    (tmp_path / "root" / "a").mkdir(parents=True)
    (tmp_path / "root" / "a" / "x.png").write_bytes(b"not a png")
    (tmp_path / "root" / "a" / "y.jpg").write_bytes(b"")
    return ["folder", "--root", tmp_path / "root"]


def _all_missing_manifest(tmp_path: Path) -> list:
    (tmp_path / "labels.csv").write_text("path,label\ngone.png,0\nalso-gone.png,1\n")
    return ["manifest", "--file", tmp_path / "labels.csv"]


def _pairs_without_captions(tmp_path: Path) -> list:
    save_image(tmp_path / "pairs" / "0.png")
    return ["pairs", "--folder", tmp_path / "pairs"]


def _coco_all_wrong_size(tmp_path: Path) -> list:
    save_image(tmp_path / "images" / "a.png", size=(10, 10))
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 20, "height": 10}], "annotations": [],
            "categories": [{"id": 1, "name": "cat"}]}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    return ["coco", "--annotations", tmp_path / "coco.json", "--images", tmp_path / "images"]


def _coco_without_images(tmp_path: Path) -> list:
    (tmp_path / "images").mkdir()
    (tmp_path / "coco.json").write_text(json.dumps({"images": [], "categories": [{"id": 1, "name": "cat"}]}))
    return ["coco", "--annotations", tmp_path / "coco.json", "--images", tmp_path / "images"]


def _idx_without_images(tmp_path: Path) -> list:
    images, labels = write_idx(tmp_path / "idx", 0)
    return ["idx", "--images", images, "--labels", labels]


@pytest.mark.parametrize("make_input, fragments", [
    (_all_bad_folder, ["all 2 of", "root were skipped (undecodable_image=2", "x.png"]),
    (_all_missing_manifest, ["all 2 of", "labels.csv were skipped (unreadable_file=2", "gone.png"]),
    (_pairs_without_captions, ["all 1 of", "pairs were skipped (missing_caption=1", "no caption file 0.txt"]),
    (_coco_all_wrong_size, ["all 1 of", "coco.json were skipped (size_mismatch=1", "says 20x10, image is 10x10"]),
    (_coco_without_images, ["coco.json holds none"]),
    (_idx_without_images, ["images.gz holds none"]),
], ids=["folder-all-bad", "manifest-all-missing", "pairs-no-captions", "coco-all-skipped", "coco-empty", "idx-empty"])
def test_cli_writing_nothing_is_an_error(tmp_path, capsys, make_input, fragments):
    code, _, err = cli(capsys, *make_input(tmp_path), "--out", tmp_path / "out")
    *skips, error = err.strip().splitlines()
    assert all(line.startswith("skipping ") for line in skips)  # each skip as it happens, then one error line
    assert_one_error_line(code, error, "no samples written", *fragments)


# ------------------------------------------------------------------------------------------------ every kind


def _labelled_shards(tmp_path: Path) -> Path:
    """Labelled shards of 4 images in tmp_path/labelled (2 shards), written by the CLI."""
    images, labels = write_idx(tmp_path / "idx", 4)
    assert data_cli(["idx", "--images", str(images), "--labels", str(labels), "--out", str(tmp_path / "labelled"),
                     "--shard-size", "2", "--no-progress"]) == 0
    return tmp_path / "labelled"


def _idx(tmp_path: Path, *extra) -> list:
    images, labels = write_idx(tmp_path / "idx", 4)
    return ["idx", "--images", images, "--labels", labels, *extra]


def _idx_truncated_gzip(tmp_path: Path) -> list:
    argv = _idx(tmp_path)
    images = tmp_path / "idx" / "images.gz"
    images.write_bytes(images.read_bytes()[:30])
    return argv


def _beside_a_file(tmp_path: Path) -> list:
    (tmp_path / "file").write_text("x")
    return _idx(tmp_path)


def _full_output(tmp_path: Path) -> list:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    return _idx(tmp_path)


def _manifest(tmp_path: Path, text: str, name: str = "labels.csv") -> list:
    save_image(tmp_path / "a.png")
    save_image(tmp_path / "b.png", seed=1)
    (tmp_path / name).write_text(text)
    return ["manifest", "--file", tmp_path / name]


def _pairs_manifest(tmp_path: Path, text: str) -> list:
    return ["pairs", "--manifest", _manifest(tmp_path, text, name="pairs.csv")[-1]]


def _coco(tmp_path: Path, **changes) -> list:
    save_image(tmp_path / "images" / "a.png", size=(10, 10))
    coco = {"images": [{"id": 1, "file_name": "a.png", "width": 10, "height": 10}],
            "annotations": [GOOD_BOX],
            "categories": [{"id": 1, "name": "cat"}], **changes}
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    return ["coco", "--annotations", tmp_path / "coco.json", "--images", tmp_path / "images"]


def _coco_truncated(tmp_path: Path) -> list:
    argv = _coco(tmp_path)
    (tmp_path / "coco.json").write_text('{"images": [')
    return argv


def _coco_without_image_folder(tmp_path: Path) -> list:
    return [*_coco(tmp_path)[:3], "--images", tmp_path / "nope"]


def _shard_without_stats(tmp_path: Path) -> list:
    with wds.TarWriter(str(tmp_path / "x.tar")) as writer:
        writer.write({"__key__": "a", "png": png_8bit(RAMP_8BIT), "cls": b"0"})
    return ["captions", "--shards", tmp_path / "x.tar"]


def _truncated_shard(tmp_path: Path) -> list:
    shards = _labelled_shards(tmp_path)
    second = shards / "train-000001.tar"
    second.write_bytes(second.read_bytes()[:700])
    return ["captions", "--shards", shards]


def _folder(tmp_path: Path) -> list:
    save_image(tmp_path / "root" / "a" / "x.png")
    return ["folder", "--root", tmp_path / "root"]


GOOD_BOX = {"id": 7, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}
NAN_BOX = [{**GOOD_BOX, "bbox": [float("nan"), 1, 2, 2]}]

ERROR_CASES = {
    # name: (make the argv before --out, --out under tmp_path, fragments of the one error line)
    "idx-missing-file": (lambda t: ["idx", "--images", t / "nope.gz", "--labels", t / "nope.gz"], "out",
                         ["nope.gz: cannot read IDX file"]),
    "idx-directory-as-file": (lambda t: ["idx", "--images", t, "--labels", t], "out", ["Is a directory"]),
    "idx-truncated-gzip": (_idx_truncated_gzip, "out", ["images.gz: corrupt gzip data"]),
    "idx-duplicate-classes": (lambda t: _idx(t, "--classes", "a,a"), "out",
                              ["class names (--classes) must be distinct"]),
    "folder-missing": (lambda t: ["folder", "--root", t / "nope"], "out", ["nope: image folder does not exist"]),
    "folder-empty": (lambda t: (t / "empty").mkdir() or ["folder", "--root", t / "empty"], "out",
                     ["no class sub-folders"]),
    "folder-out-inside-root": (_folder, "root/shards", ["lies inside --root"]),
    "manifest-header-only": (lambda t: _manifest(t, "path,label\n"), "out", ["labels.csv: manifest has no rows"]),
    "manifest-mixed-labels": (lambda t: _manifest(t, "path,label\na.png,0\nb.png,1.0\n"), "out",
                              ["labels.csv:3: label '1.0' mixes class names and class ids"]),
    "manifest-unknown-format": (lambda t: _manifest(t, "path,label\n", name="labels.xlsx"), "out",
                                ["unknown manifest format"]),
    "manifest-bad-json": (lambda t: _manifest(t, '{"path": "a.png", "label": 0}\n{"path": \n', name="m.jsonl"),
                          "out", ["m.jsonl:2: not valid JSON"]),
    "pairs-huge-csv-field": (lambda t: _pairs_manifest(t, "path,caption\na.png," + "x" * 200_000 + "\n"), "out",
                             ["pairs.csv: not valid CSV after line 1 (field larger than field limit"]),
    "pairs-missing-manifest": (lambda t: ["pairs", "--manifest", t / "nope.csv"], "out", ["cannot read manifest"]),
    "coco-truncated-json": (_coco_truncated, "out", ["coco.json: not valid JSON"]),
    "coco-images-not-a-list": (lambda t: _coco(t, images=5), "out", ["coco.json: images must be a list"]),
    "coco-categories-null": (lambda t: _coco(t, categories=None), "out", ["categories must be a list"]),
    "coco-annotations-object": (lambda t: _coco(t, annotations={"a": 1}), "out", ["annotations must be a list"]),
    "coco-file-name-number": (lambda t: _coco(t, images=[{"id": 1, "file_name": 5}]), "out",
                              ["images[0]: file_name must be a string"]),
    "coco-id-list": (lambda t: _coco(t, images=[{"id": [1], "file_name": "a.png"}]), "out",
                     ["images[0]: id must be an integer"]),
    "coco-width-string": (lambda t: _coco(t, images=[{"id": 1, "file_name": "a.png", "width": "10", "height": 10}]),
                          "out", ["images[0] (id 1): width must be a positive integer"]),
    "coco-bbox-nan": (lambda t: _coco(t, annotations=NAN_BOX), "out",
                      ["annotations[0] (id 7): bbox must be 4 numbers"]),
    "coco-iscrowd-string": (lambda t: _coco(t, annotations=[{**GOOD_BOX, "iscrowd": "no"}]), "out",
                            ["annotations[0] (id 7): iscrowd must be 0 or 1, got 'no'"]),
    "coco-area-null": (lambda t: _coco(t, annotations=[{**GOOD_BOX, "area": None}]), "out",
                       ["annotations[0] (id 7): area must be a number >= 0, got None"]),
    "coco-duplicate-category": (lambda t: _coco(t, categories=[{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]),
                                "out", ["categories[1]: duplicate category id 1"]),
    "coco-missing-image-folder": (_coco_without_image_folder, "out", ["nope: image folder does not exist"]),
    "captions-no-stats": (_shard_without_stats, "out", ["stats.json does not exist"]),
    "captions-truncated-shard": (_truncated_shard, "out",
                                 ["train-000001.tar: cannot read this labelled shard (ReadError"]),
    "captions-out-holds-input": (lambda t: ["captions", "--shards", _labelled_shards(t)], "labelled",
                                 ["holds the input shard"]),
    "out-is-a-file": (_beside_a_file, "file", ["file: exists and is not a directory"]),
    "out-under-a-file": (_beside_a_file, "file/sub", ["cannot create the output directory (Not a directory)"]),
    "out-holds-files": (_full_output, "out", ["already holds 1 file(s) (keep.txt)", "--overwrite"]),
    "val-fraction-one": (lambda t: _idx(t, "--val-fraction", "1"), "out", ["--val-fraction in [0, 1)"]),
    "val-fraction-negative": (lambda t: _idx(t, "--val-fraction", "-0.1"), "out", ["--val-fraction in [0, 1)"]),
    "val-fraction-rounds-to-nothing": (lambda t: _idx(t, "--val-fraction", "0.1"), "out",
                                       ["a val_fraction of 0.1 of 4 items leaves val empty"]),
    "max-shard-bytes-zero": (lambda t: _idx(t, "--max-shard-bytes", "0"), "out", ["--max-shard-bytes must be >= 1"]),
    "jpeg-quality-out-of-range": (lambda t: ["embedded", "--jpeg-quality", "0"], "out", ["jpeg_quality must be"]),
}


@pytest.mark.parametrize("name", list(ERROR_CASES))
def test_cli_bad_input_is_one_error_line(tmp_path, capsys, name):
    make_argv, out, fragments = ERROR_CASES[name]
    argv = make_argv(tmp_path)
    capsys.readouterr()  # what building the input printed
    code, stdout, err = cli(capsys, *argv, "--out", tmp_path / out)
    assert_one_error_line(code, err, *fragments)
    assert stdout == ""


def _captions_with_bad_samples(tmp_path: Path) -> list:
    """Labelled shards plus a shard of three bad samples: no cls, a cls that is no number, a label past the
    classes; the good 4 samples are captioned, the bad ones counted."""
    shards = _labelled_shards(tmp_path)
    image = png_8bit(RAMP_8BIT)
    with wds.TarWriter(str(shards / "extra.tar")) as writer:
        writer.write({"__key__": "no-cls", "png": image})
        writer.write({"__key__": "word-cls", "png": image, "cls": b"cat"})
        writer.write({"__key__": "big-cls", "png": image, "cls": b"12"})
    spec = ",".join(str(shards / name) for name in ("train-000000.tar", "train-000001.tar", "extra.tar"))
    return ["captions", "--shards", spec]


def _manifest_with_odd_entries(tmp_path: Path) -> list:
    """Two good images and, one each: a directory, a named pipe (reading it would wait forever), a path with a
    NUL byte, a text file called .png, a truncated PNG, a missing file."""
    (tmp_path / "folder.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")
    (tmp_path / "text.png").write_text("hello")
    save_image(tmp_path / "cut.png", size=(64, 64))
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:200])
    rows = ["a.png", "folder.png", "pipe.png", "nul\x00.png", "text.png", "cut.png", "gone.png", "b.png"]
    return _manifest(tmp_path, "path,label\n" + "".join(f"{row},0\n" for row in rows))


@pytest.mark.parametrize("make_input, samples, skipped", [
    (_manifest_with_odd_entries, 2, {"unreadable_file": 4, "undecodable_image": 2}),
    (_captions_with_bad_samples, 4, {"missing_field": 1, "bad_label": 2}),
], ids=["manifest-odd-entries", "captions-bad-samples"])
def test_cli_one_bad_sample_among_good_ones_is_a_counted_skip(tmp_path, capsys, make_input, samples, skipped):
    argv = make_input(tmp_path)
    capsys.readouterr()
    code, stdout, err = cli(capsys, *argv, "--out", tmp_path / "out", "--workers", "2")
    assert code == 0, err
    stats = stats_of(tmp_path / "out")
    assert stats["samples"] == samples and stats["skipped"] == skipped
    lines = err.strip().splitlines()
    assert len(lines) == min(sum(skipped.values()), 5) and all(line.startswith("skipping ") for line in lines)
    assert f"{samples} samples in 1 shard(s)" in stdout


def test_manifest_with_a_byte_order_mark_reads_its_header(tmp_path, capsys):
    argv = _manifest(tmp_path, "\ufeffpath,label\na.png,cat\nb.png,dog\n")
    code, stdout, err = cli(capsys, *argv, "--out", tmp_path / "out")
    assert code == 0, err
    assert stats_of(tmp_path / "out")["classes"] == ["cat", "dog"]
