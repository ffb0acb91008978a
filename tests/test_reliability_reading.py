"""Bad shards on the reading side never hang a run, never end in a traceback and never change the data silently:
through `python -m pretrain` / `python -m finetune` (a process of its own where a hang or the exit status is the
point), each fault ends with one line naming the file and exit status 2, or is read past and counted."""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from data import DataError, ShardStream, count_samples, expand_shards
from data.writer import INCOMPLETE_FILE
from finetune.cli import main as finetune_main
from pretrain.cli import main as pretrain_main
from pretrain.tasks import MAETask

from stream_helpers import as_uint8_tensor, collect, total_skipped

REPO = Path(__file__).resolve().parents[1]
HANG_GUARD_S = 180  # far beyond what any run here needs: only a process that hangs gets there
QUICK = ["train.epochs=1", "train.batch_size=8", "train.mixed_precision=no", "logging.wandb=disabled",
         "logging.progress_bar=false"]

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------ helpers


def run_module(module: str, *args: str, timeout: float = HANG_GUARD_S) -> subprocess.CompletedProcess:
    """`python -m module args` in a process group of its own; still running after `timeout` s fails the test as a
    hang (and kills the group: the run and its data workers)."""
    process = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"},
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"python -m {module} hung: still running {timeout} s after it started; stderr ends:\n{err[-3000:]}")
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def the_error(stderr: str) -> str:
    """The one `error: ...` line of a failed run, which printed no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, stderr[-3000:]
    return lines[0]


def error_of(capsys) -> str:
    return the_error(capsys.readouterr().err)


def copy_shards(source: Path, target: Path, *, stats: bool = True) -> Path:
    """A copy of a shard folder; stats=False leaves out stats.json and sizes.json (shards from elsewhere)."""
    shutil.copytree(source, target, ignore=None if stats else shutil.ignore_patterns("*.json"))
    return target


def garbage(seed: int) -> bytes:
    """5000 random bytes, the same for a seed (a tar reader's complaint depends on them: "invalid header")."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (5000,), generator=generator, dtype=torch.uint8).numpy().tobytes()


def overwrite_with_garbage(directory: Path) -> None:
    for index, shard in enumerate(sorted(directory.glob("*.tar"))):
        shard.write_bytes(garbage(index))


def members(shard: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(shard) as tar:
        return tar.getmembers()


def sample_members(shard: Path, index: int) -> list[tarfile.TarInfo]:
    """The files of the index-th sample of a shard (a sample is the files sharing a key: 0000012.cls, 0000012.png)."""
    everything = members(shard)
    keys = list(dict.fromkeys(m.name.split(".")[0] for m in everything))
    return [m for m in everything if m.name.split(".")[0] == keys[index]]


def cut(shard: Path, at: int) -> None:
    shard.write_bytes(shard.read_bytes()[:at])


def cut_inside_sample(shard: Path, index: int) -> None:
    """Truncate a shard in the middle of the data of its index-th sample's last file: `index` samples stay whole."""
    last = max(sample_members(shard, index), key=lambda m: m.offset)
    cut(shard, last.offset_data + last.size // 2)


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def demo_args(train, val, output_dir, *overrides) -> list[str]:
    """A run of the demo MAE (the default model) on tiny shards; no pictures, so data.val is only checked."""
    return [f"data.train={train}", f"data.val={val}", f"output_dir={output_dir}", "num_pictures=0", *QUICK,
            *overrides]


@pytest.fixture(scope="module")
def garbage_with_stats(tiny_shards, tmp_path_factory) -> Path:
    """The tiny training shards overwritten with random bytes, their stats.json and sizes.json left in place (as
    after `python -m data embedded --out DIR` and a disk that lost the tar files)."""
    garbage = copy_shards(tiny_shards[0], tmp_path_factory.mktemp("garbage") / "train")
    overwrite_with_garbage(garbage)
    return garbage


@pytest.fixture(scope="module")
def garbage_without_stats(tiny_shards, tmp_path_factory) -> Path:
    garbage = copy_shards(tiny_shards[0], tmp_path_factory.mktemp("garbage") / "train", stats=False)
    overwrite_with_garbage(garbage)
    return garbage


# ------------------------------------------------------------------------------------------------ hangs


def test_fewer_shards_than_reading_slots_ends_the_run_instead_of_hanging(tiny_shards, tmp_path):
    one = tmp_path / "one"
    one.mkdir()
    shutil.copy(expand_shards(tiny_shards[0])[0], one)  # a folder with one shard, read by 2 DataLoader workers
    result = run_module("pretrain", *demo_args(one, tiny_shards[1], tmp_path / "run", "data.num_workers=2"))
    assert result.returncode == 2, result.stderr[-3000:]
    line = the_error(result.stderr)
    assert "1 shard(s) (starting with" in line and "for 2 reading slots" in line
    assert "data.resampled=true" in line and "at most 1 DataLoader worker(s) (data.num_workers)" in line


def test_unreadable_shards_read_by_workers_end_the_run_instead_of_hanging(garbage_with_stats, tiny_shards,
                                                                          tmp_path):
    result = run_module("pretrain", *demo_args(garbage_with_stats, tiny_shards[1], tmp_path / "run",
                                               "data.num_workers=2"))
    assert result.returncode == 2, result.stderr[-3000:]
    line = the_error(result.stderr)
    assert str(garbage_with_stats / "train-00000") in line and "ReadError: invalid header" in line
    assert "can be read" in line and "fewer workers" not in line


class NonFiniteAtStep2(MAETask):
    calls = 0

    def __call__(self, model, batch):
        NonFiniteAtStep2.calls += 1
        outputs = super().__call__(model, batch)
        if NonFiniteAtStep2.calls == 2:
            outputs["loss"] = outputs["loss"] * float("nan")
        return outputs


def test_a_failed_run_leaves_no_data_worker_behind(tiny_args, garbage_with_stats, tmp_path, monkeypatch, capsys):
    """The root of the hangs above: the loader's workers outlived the error (its traceback kept the loader alive)
    and the interpreter waited for them at exit. An error in a worker, or in the training loop, stops them at once."""
    assert pretrain_main(tiny_args(tmp_path / "worker_error", f"data.train={garbage_with_stats}",
                                   "data.num_workers=2")) == 2
    assert "ReadError" in error_of(capsys)
    assert multiprocessing.active_children() == []

    monkeypatch.setattr("pretrain.train_mae.MAETask", NonFiniteAtStep2)
    assert pretrain_main(tiny_args(tmp_path / "loop_error", "data.num_workers=2")) == 3
    assert "non-finite loss" in capsys.readouterr().err
    assert multiprocessing.active_children() == []


def test_an_error_on_one_of_two_processes_ends_both(tiny_shards, tmp_path):
    """2 processes (torchrun, gloo), a DataLoader worker each: the rank whose shard is garbage stops with its
    message (its worker with it); the other one, waiting for it in the gradient all-reduce, learns that its peer is
    gone and stops too, within seconds."""
    shards = copy_shards(tiny_shards[0], tmp_path / "train")
    (shards / "train-000001.tar").write_bytes(garbage(1))
    result = run_module("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "pretrain",
                        *demo_args(shards, tiny_shards[1], tmp_path / "run", "data.num_workers=1"))
    assert result.returncode != 0
    assert "exitcode  : 2" in result.stderr  # torchrun's failure summary: the rank that read the garbage
    assert f"{shards / 'train-000001.tar'}: ReadError: invalid header" in result.stderr


def test_a_failed_run_exits_even_when_something_holds_the_interpreter(tmp_path):
    """The last line of defence of `python -m pretrain/finetune`: after a failure, whatever still holds the
    interpreter at exit (here a thread that never ends) cannot keep the process alive past EXIT_GRACE_S."""
    script = ("import threading, time\n"
              "import pretrain.cli as cli\n"
              "cli.EXIT_GRACE_S = 1\n"
              "threading.Thread(target=time.sleep, args=(600,)).start()  # not a daemon: exit would wait for it\n"
              "cli.exit_with(lambda: 2)\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=HANG_GUARD_S)
    assert result.returncode == 2
    assert "still exiting 1 s after the run stopped; ending the process" in result.stderr


def test_ctrl_c_while_workers_read_saves_and_exits_with_130(embedded_cache, tmp_path):
    """SIGINT to the whole process group (a terminal's Ctrl-C) reaches the DataLoader workers too: the run finishes
    its step, saves it and exits 130 with one line, without a traceback, and the workers leave with it."""
    out = tmp_path / "run"
    args = [f"data.cache_dir={embedded_cache}", f"output_dir={out}", "data.num_workers=2", "train.log_every=1",
            "num_pictures=0", *QUICK]
    process = subprocess.Popen([sys.executable, "-m", "pretrain", *args], cwd=REPO, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.monotonic() + HANG_GUARD_S
        while not ((out / "log.jsonl").exists() and (out / "log.jsonl").read_text()):
            assert process.poll() is None, process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the run logged no step"
            time.sleep(0.05)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=HANG_GUARD_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 130, err[-3000:]
    assert "interrupted: SIGINT received: stopped after step" in err and "Traceback" not in err
    with pytest.raises(ProcessLookupError):  # nobody left in the group: the workers ended too
        os.killpg(process.pid, 0)


# ------------------------------------------------------------------------------------------------ unreadable files


@pytest.mark.parametrize("fault", ["random bytes", "a JPEG", "an empty file"])
def test_a_file_that_is_not_a_tar_is_one_line_naming_it(tiny_args, tmp_path, capsys, fault):
    """Shards from elsewhere (no stats.json) are counted by reading them: nothing readable is one clear error."""
    bad = tmp_path / "shards" / ("picture.jpg" if fault == "a JPEG" else "train-000000.tar")
    bad.parent.mkdir()
    if fault == "a JPEG":
        Image.new("RGB", (8, 8)).save(bad)
    else:
        bad.write_bytes(garbage(0) if fault == "random bytes" else b"")
    assert pretrain_main(tiny_args(tmp_path / "run", f"data.train={bad}")) == 2
    line = error_of(capsys)
    assert f"{bad} is not a readable tar file (ReadError: " in line


def test_shards_from_elsewhere_damaged_in_part_are_counted_to_the_damage(tiny_shards, tmp_path):
    shards = copy_shards(tiny_shards[0], tmp_path / "train", stats=False)
    first = shards / "train-000000.tar"
    cut_inside_sample(first, 10)
    with pytest.warns(UserWarning, match=r"train-000000.tar cannot be read to the end \(ReadError: "):
        assert count_samples(shards) == 10 + 32


def test_a_shard_cut_between_two_samples_is_not_taken_for_a_complete_one(tiny_shards, tmp_path):
    """A tar cut at a header boundary reads as a shorter archive without any error: the missing end-of-archive
    blocks tell, and its index tells how many samples went with it."""
    shards = copy_shards(tiny_shards[0], tmp_path / "train")
    first = shards / "train-000000.tar"
    cut(first, min(m.offset for m in sample_members(first, 12)))  # the first header of the 13th sample
    stream = ShardStream(first, as_uint8_tensor(), 5, train=False)  # 12 samples: the last batch tells
    assert total_skipped(collect(stream, num_workers=0)) == {"bad_tar": 32 - 12}
    (shards / "stats.json").unlink()
    (shards / "sizes.json").unlink()  # no index: the cut is still seen, the loss is unknown (counted once)
    stream = ShardStream(first, as_uint8_tensor(), 5, train=False)
    assert total_skipped(collect(stream, num_workers=0)) == {"bad_tar": 1}


def test_a_truncated_shard_counts_every_sample_it_lost_in_the_log(tiny_args, tiny_shards, tmp_path):
    """"Nothing lost silently", in numbers: log.jsonl counts the samples the shard's index says were lost."""
    shards = copy_shards(tiny_shards[0], tmp_path / "train")
    cut_inside_sample(shards / "train-000000.tar", 10)  # 10 samples readable, 22 lost
    out = tmp_path / "run"
    assert pretrain_main(tiny_args(out, f"data.train={shards}", "train.log_every=1")) == 0
    lost = [record["skipped"]["bad_tar"] for record in read_log(out) if "bad_tar" in record["skipped"]]
    assert lost and set(lost) == {32 - 10}  # once per pass over the shard


@pytest.mark.parametrize("with_stats", [True, False], ids=["stats.json", "no stats.json"])
def test_all_shards_unreadable_without_workers_says_so(tiny_args, tiny_shards, tmp_path, capsys, with_stats):
    shards = copy_shards(tiny_shards[0], tmp_path / "train", stats=with_stats)
    overwrite_with_garbage(shards)
    # data.samples_per_epoch: no counting up front, the stream itself meets the garbage
    assert pretrain_main(tiny_args(tmp_path / "run", f"data.train={shards}", "data.samples_per_epoch=64")) == 2
    line = error_of(capsys)
    assert "every shard is unreadable (e.g. " in line and "ReadError: invalid header" in line
    assert "fewer workers" not in line and "more data" not in line


def test_resampled_streams_over_unreadable_shards_stop_naming_the_error(tiny_args, garbage_without_stats, tmp_path,
                                                                        capsys):
    assert pretrain_main(tiny_args(tmp_path / "run", f"data.train={garbage_without_stats}", "data.resampled=true",
                                   "data.samples_per_epoch=64")) == 2
    line = error_of(capsys)
    assert "100 shard draws in a row gave no samples" in line and ": ReadError: invalid header)" in line


def test_one_unreadable_source_of_a_mix_is_counted_not_hidden(tiny_args, tiny_shards, garbage_without_stats,
                                                              tmp_path):
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="cannot be read to the end"):
        assert pretrain_main(tiny_args(out, f"data.train={tiny_shards[0]}::{garbage_without_stats}",
                                       "data.resampled=true", "data.weights=[1,3]", "train.log_every=1")) == 0
    assert sum(record["skipped"].get("bad_tar", 0) for record in read_log(out)) > 0


def test_unreadable_evaluation_shards_are_one_line_not_a_traceback(tiny_args, garbage_without_stats, tmp_path,
                                                                   capsys):
    """MAE's pictures read data.val after training: shards that give no image stop with a line naming them."""
    assert pretrain_main(tiny_args(tmp_path / "run", f"data.val={garbage_without_stats}")) == 2
    line = error_of(capsys)
    assert str(garbage_without_stats) in line and "ReadError: invalid header" in line


# ------------------------------------------------------------------------------------------------ interrupted writes


@pytest.mark.parametrize("key", ["data.train", "data.val"])
def test_shards_whose_writing_was_interrupted_are_refused(tiny_args, tiny_shards, tmp_path, capsys, key):
    shards = copy_shards(tiny_shards[0 if key == "data.train" else 1], tmp_path / "shards")
    (shards / INCOMPLETE_FILE).touch()
    out = tmp_path / "run"
    assert pretrain_main(tiny_args(out, f"{key}={shards}")) == 2
    assert error_of(capsys) == (f"error: {shards}: writing these shards was interrupted, or is still under way (the "
                                f"folder holds {INCOMPLETE_FILE}); rewrite it with `python -m data`")
    assert not (out / "log.jsonl").exists()

    # also when the shards are named one by one, and before the writer's first shard
    with pytest.raises(DataError, match="writing these shards was interrupted"):
        expand_shards(sorted(str(shard) for shard in shards.glob("*.tar")))
    for shard in shards.glob("*.tar"):
        shard.unlink()
    with pytest.raises(DataError, match="writing these shards was interrupted"):
        expand_shards(shards)


# ------------------------------------------------------------------------------------------------ other faults


def test_unreadable_stats_json_and_shard_lists_are_one_line(tiny_args, tiny_shards, tmp_path, capsys):
    shards = copy_shards(tiny_shards[0], tmp_path / "train")
    (shards / "stats.json").write_text("[1, 2]")  # JSON, but not what `python -m data` writes
    assert pretrain_main(tiny_args(tmp_path / "run", f"data.train={shards}")) == 2
    assert f"{shards / 'stats.json'}: cannot read shard statistics (a JSON list, not an object)" in error_of(capsys)

    listing = tmp_path / "shards.txt"
    listing.write_text(f"{expand_shards(tiny_shards[0])[0]}\nmissing-000001.tar\n")
    assert pretrain_main(tiny_args(tmp_path / "run2", f"data.train={listing}")) == 2
    assert error_of(capsys) == (f"error: shard file or directory {tmp_path / 'missing-000001.tar'} does not exist "
                                f"(listed in {listing}, line 2)")


def test_shards_that_hold_no_samples_are_not_a_batch_size_problem(tiny_args, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for index in range(2):
        tarfile.open(empty / f"train-{index:06d}.tar", "w").close()  # valid tar files, no member
    assert pretrain_main(tiny_args(tmp_path / "run", f"data.train={empty}")) == 2
    assert error_of(capsys) == "error: the training shards hold no samples; check data.train"


def test_too_few_shards_for_the_processes_does_not_advise_fewer_workers(tiny_shards):
    one = expand_shards(tiny_shards[0])[:1]
    stream = ShardStream(one, as_uint8_tensor(), 4, train=True, rank=0, world_size=2)
    with pytest.raises(DataError) as raised:
        collect(stream, num_workers=0, max_batches=1)
    assert "data.resampled=true" in str(raised.value) and "data.num_workers" not in str(raised.value)


# ------------------------------------------------------------------------------------------------ kinds of shards


def test_clip_on_labelled_shards_says_what_they_are_and_how_to_make_pairs(tiny_shards, tmp_path, capsys):
    status = pretrain_main(["--config", str(REPO / "configs/clip_vit_tiny_demo.yaml"), f"data.train={tiny_shards[0]}",
                            f"output_dir={tmp_path / 'run'}", "data.num_workers=0", *QUICK])
    assert status == 2
    assert error_of(capsys) == (f"error: {tiny_shards[0]} holds labelled shards (no txt field), but this run reads "
                                f"image-text samples; `python -m data captions --shards {tiny_shards[0]} --out DIR` "
                                f"makes image-text pairs from them")


def test_mae_on_image_text_shards_says_what_they_are(tiny_args, tiny_pair_shards, tmp_path, capsys):
    assert pretrain_main(tiny_args(tmp_path / "run", f"data.train={tiny_pair_shards}")) == 2
    line = error_of(capsys)
    assert line.startswith(f"error: {tiny_pair_shards} holds image-text shards (no cls field), but this run reads "
                           f"labelled samples")


def test_shards_of_another_kind_without_stats_are_named_by_their_fields(tiny_shards, tmp_path):
    labelled = copy_shards(tiny_shards[0], tmp_path / "train", stats=False)
    stream = ShardStream(labelled, as_uint8_tensor(), 4, train=True, kind="image-text", shuffle_buffer=0)
    with pytest.raises(DataError) as raised:
        collect(stream, num_workers=0, max_batches=1)
    message = str(raised.value)
    assert "samples skipped (missing_field: " in message and "has fields cls, png" in message
    assert f"{labelled} holds labelled shards (no txt field)" in message and "python -m data captions" in message
    assert "raise the allowed skip rate" not in message  # nothing was usable: a higher limit would not help


def test_no_usable_sample_in_a_whole_pass_stops_even_when_every_skip_is_allowed(tiny_shards, tmp_path):
    """max_skip_rate=1.0 never stops for the rate, but a training stream that cannot fill one batch would spin."""
    labelled = copy_shards(tiny_shards[0], tmp_path / "train", stats=False)
    stream = ShardStream(labelled, as_uint8_tensor(), 4, train=True, kind="image-text", max_skip_rate=1.0)
    with pytest.raises(DataError, match=r"a whole pass over its shards gave no usable sample \(skipped: "
                                        r"\{'missing_field': 64\}\)"):
        collect(stream, num_workers=0, max_batches=1)


# ------------------------------------------------------------------------------------------------ finetune


@pytest.fixture(scope="module")
def pretrained_run(tmp_path_factory, micro_model, tiny_shards):
    train_dir, val_dir = tiny_shards
    out = tmp_path_factory.mktemp("mae_run")
    argv = [f"model.name={micro_model}", f"data.train={train_dir}", f"data.val={val_dir}", "data.image_size=16",
            "data.num_workers=0", "num_pictures=0", f"output_dir={out}", *QUICK]
    assert pretrain_main(argv) == 0
    return out


@pytest.mark.parametrize("fault", ["garbage val", "garbage val read by workers", "interrupted val"])
def test_linear_probe_on_bad_evaluation_shards_is_one_line(pretrained_run, tiny_shards, garbage_with_stats,
                                                           garbage_without_stats, tmp_path, capsys, fault):
    val = garbage_without_stats
    if fault == "garbage val read by workers":
        val = garbage_with_stats  # counted from its stats.json: the workers meet the garbage
    elif fault == "interrupted val":
        val = copy_shards(tiny_shards[1], tmp_path / "val")
        (val / INCOMPLETE_FILE).touch()
    workers = 2 if "workers" in fault else 0
    status = finetune_main(["--config", str(REPO / "configs/linprobe_mae_tiny_demo.yaml"),
                            f"encoder.checkpoint={pretrained_run}", f"data.train={tiny_shards[0]}", f"data.val={val}",
                            "data.image_size=16", f"data.num_workers={workers}", "feature_batch_size=32",
                            f"output_dir={tmp_path / 'probe'}", *QUICK])
    assert status == 2
    assert str(val) in error_of(capsys)
    assert multiprocessing.active_children() == []
