"""data.shards.read_tar_samples: the samples and the errors of webdataset's tarfile_samples, whichever way it reads."""

import io
import tarfile
from pathlib import Path

import pytest
from webdataset.handlers import reraise_exception
from webdataset.tariterators import tarfile_samples

from data.shards import _plain_tar_samples, read_tar_samples


def webdataset_reading(path: Path) -> tuple[list[dict], str | None]:
    samples = []
    try:
        for sample in tarfile_samples([{"url": str(path)}], handler=reraise_exception):
            samples.append(sample)
    except Exception as error:
        return samples, f"{type(error).__name__}: {error.args[0]}"
    return samples, None


def our_reading(path: Path) -> tuple[list[dict], str | None]:
    samples = []
    try:
        for sample in read_tar_samples(str(path)):
            samples.append(sample)
    except Exception as error:
        return samples, f"{type(error).__name__}: {error.args[0]}"
    return samples, None


def write_tar(path: Path, members: list[tuple[str, bytes | None]], format=tarfile.USTAR_FORMAT, mode="w") -> Path:
    """members: (name, data), data None for a directory."""
    with tarfile.open(path, mode, format=format) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


MEMBERS = [
    ("__meta__", b"skipped by webdataset"),
    ("a", None),
    ("a/0001.png", b"\x89PNG one"),
    ("a/0001.cls", b"3"),
    ("a/0001.JSON", b"{}"),  # suffixes are lower-cased
    ("0002.png", b""),  # an empty file is a value too
    ("0002.cls", b"4"),
    ("no_suffix", b"dropped: no key.suffix"),
    ("d" * 120 + "/0003.seg.png", bytes(range(256)) * 5),  # a long name: ustar's prefix field, or pax/GNU headers
    ("d" * 120 + "/0003.cls", b"5"),
]


@pytest.mark.parametrize("format", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_the_same_samples_as_webdataset_in_every_tar_format(tmp_path, format):
    path = write_tar(tmp_path / "shard.tar", MEMBERS, format=format)
    samples, error = our_reading(path)
    assert error is None
    assert samples == webdataset_reading(path)[0]
    assert [sample["__key__"] for sample in samples] == ["a/0001", "0002", "d" * 120 + "/0003"]
    assert samples[0]["json"] == b"{}" and samples[2]["seg.png"] == bytes(range(256)) * 5
    assert all(sample["__url__"] == str(path) for sample in samples)


def test_plain_ustar_is_parsed_without_tarfile_and_the_rest_is_left_to_it(tmp_path):
    plain = write_tar(tmp_path / "plain.tar", MEMBERS, format=tarfile.USTAR_FORMAT)
    assert list(_plain_tar_samples(str(plain))) == webdataset_reading(plain)[0]
    # a non-ASCII name needs a pax header; a long name under GNU a long-name member; gzip no tar header at all
    for name, members, mode in [("pax.tar", [("é/0001.cls", b"1")], "w"), ("gnu.tar", MEMBERS, "w"),
                                ("packed.tar.gz", MEMBERS, "w:gz")]:
        path = write_tar(tmp_path / name, members, format=tarfile.PAX_FORMAT if name == "pax.tar"
                         else tarfile.GNU_FORMAT, mode=mode)
        with pytest.raises(Exception) as caught:
            list(_plain_tar_samples(str(path)))
        assert type(caught.value).__name__ == "_NotPlainTar"
        assert our_reading(path) == webdataset_reading(path) and our_reading(path)[0]


def damaged(tmp_path: Path) -> list[Path]:
    whole = write_tar(tmp_path / "whole.tar", MEMBERS, format=tarfile.USTAR_FORMAT).read_bytes()
    data_start = 512 * 6 + 5  # blocks: __meta__ and its data, a/, a/0001.png and its data, a/0001.cls and its data
    duplicate = write_tar(tmp_path / "duplicate.tar", [("0001.cls", b"1"), ("0002.cls", b"2"), ("0002.cls", b"3")])
    bad_checksum = bytearray(whole)
    bad_checksum[512 * 5 + 10] ^= 0xFF  # a/0001.cls's header: its checksum no longer matches
    cases = {
        "cut in a file's data": whole[:data_start],
        "cut at a header": whole[:512 * 8],
        "cut in a header": whole[:512 * 8 + 100],
        "a later header damaged": bytes(bad_checksum),
        "random bytes": bytes(range(256)) * 8,
        "empty": b"",
        "zero blocks only": bytes(1024),
    }
    paths = [duplicate]
    for name, content in cases.items():
        paths.append(tmp_path / f"{name.replace(' ', '_')}.tar")
        paths[-1].write_bytes(content)
    return paths


def test_damaged_tars_give_what_webdataset_gives_then_its_error(tmp_path):
    for path in damaged(tmp_path):
        ours, theirs = our_reading(path), webdataset_reading(path)
        assert ours == theirs, path.name
    samples, error = our_reading(tmp_path / "duplicate.tar")
    assert [s["__key__"] for s in samples] == ["0001"] and "duplicate file name" in error
    assert our_reading(tmp_path / "random_bytes.tar")[1] == "ReadError: invalid header"


def test_a_missing_file_or_a_url_goes_to_webdataset(tmp_path):
    missing = tmp_path / "missing.tar"
    assert our_reading(missing)[1] is not None and our_reading(missing) == webdataset_reading(missing)
    path = write_tar(tmp_path / "shard.tar", MEMBERS)
    url = f"file:{path}"
    assert [s["__key__"] for s in read_tar_samples(url)] == [s["__key__"] for s in webdataset_reading(url)[0]]
