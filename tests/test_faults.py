"""Fault tolerance and safe loading, through the real entry point on a micro MAE: a run killed at any moment
resumes to the same bits as an uninterrupted one; SIGTERM/SIGINT save and stop; damaged checkpoints are detected
and passed over; diverging steps are named (loss or gradient) or skipped within a budget; weights files never run
code; a checkpoint that does not fit the model lists the keys."""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pretrain.checkpoint import (
    META_FILE,
    MODEL_FILE,
    STATE_FILE,
    CheckpointError,
    find_latest,
    is_complete,
    load_state_dict_checked,
    load_torch_file,
    load_train_state,
    read_weights,
    resolve_resume,
    sha256_of,
)
from pretrain.cli import main
from pretrain.config import MAEPretrainConfig, load_config
from pretrain.engine import TrainingInterrupted
from pretrain.models import MODEL_REGISTRY, MaskedAutoencoderViT, create_model, register_model
from pretrain.tasks import MAETask
from pretrain.train_mae import run_mae

REPO = Path(__file__).resolve().parents[1]
# 16 steps (2 epochs of 8), a log line every step; the lr warms up over 4 steps, then decays
COMMON = ("train.epochs=2", "optim.base_lr=1e-3", "optim.warmup_epochs=0.5", "train.log_every=1")
LAST = 16

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------------------------ helpers


def train(argv: list[str]) -> None:
    assert main(argv) == 0


def read_log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def last_record_per_step(output_dir: Path) -> dict[int, dict]:
    """A resumed run logs again the steps between its checkpoint and the kill: the later line is the one that counts."""
    return {record["step"]: record for record in read_log(output_dir)}


def checkpoint(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step_{step:08d}"


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(a / MODEL_FILE), load_file(b / MODEL_FILE)
    assert wa.keys() == wb.keys()
    different = [name for name in wa if not torch.equal(wa[name], wb[name])]
    assert not different, f"tensors differ: {different}"


def assert_same_run(run: Path, reference: Path) -> None:
    """Bit-identical final weights, and the same lr and loss at every step (same data order, masks and updates)."""
    assert_same_weights(checkpoint(run, LAST), checkpoint(reference, LAST))
    got, expected = last_record_per_step(run), last_record_per_step(reference)
    assert sorted(got) == list(range(1, LAST + 1))
    for step in expected:
        assert (got[step]["lr"], got[step]["loss"]) == (expected[step]["lr"], expected[step]["loss"]), step


_REFERENCE: dict[str, Path] = {}


def reference_run(tiny_args, tmp_path_factory) -> Path:
    """The uninterrupted run (computed once per module)."""
    if "run" not in _REFERENCE:
        out = tmp_path_factory.mktemp("reference") / "run"
        train(tiny_args(out, *COMMON, "train.save_every=100"))
        _REFERENCE["run"] = out
    return _REFERENCE["run"]


def error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, lines
    return lines[0]


# A training process of its own, to be killed: the micro model registered as in conftest, each step slowed down so
# that a signal lands in the middle of the run, then `python -m pretrain`'s main.
RUNNER = textwrap.dedent(
    """
    import json, os, signal, sys, time
    from functools import partial
    from pathlib import Path
    import torch
    import pretrain.train_mae as train_mae
    from pretrain.cli import main
    from pretrain.models import MaskedAutoencoderViT, register_model

    name, config, delay, hang_at = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    signal_rank, signal_at = map(int, sys.argv[6].split(":"))  # this process (RANK) signals itself at this call
    register_model(name, partial(MaskedAutoencoderViT, **config))
    if os.environ.get("CHECKS_READ_LATE"):  # the host reads step flags a step late, as on an accelerator
        import pretrain.engine
        pretrain.engine.checks_read_late = lambda device: 1

    class SlowTask(train_mae.MAETask):
        calls = 0

        def __call__(self, model, batch):
            SlowTask.calls += 1
            if SlowTask.calls == hang_at:  # a step that never ends (a hung collective, a stuck disk)
                Path(sys.argv[5]).write_text("hanging")
                time.sleep(600)
            if SlowTask.calls == signal_at and int(os.environ.get("RANK", 0)) == signal_rank:
                os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(delay)
            return super().__call__(model, batch)

    train_mae.MAETask = SlowTask
    torch.set_num_threads(1)
    sys.exit(main(sys.argv[7:]))
    """
)


def runner_command(tmp_path: Path, micro_model: str, argv: list[str], delay: float = 0.05, hang_at: int = 0,
                   marker: Path | None = None, signal_at: str = "0:0") -> list[str]:
    script = tmp_path / "runner.py"
    script.write_text(RUNNER)
    config = json.dumps(create_model(micro_model).config)
    return [str(script), micro_model, config, str(delay), str(hang_at), str(marker or tmp_path / "x"), signal_at, *argv]


def start_run(tmp_path: Path, micro_model: str, argv: list[str], **kwargs) -> subprocess.Popen:
    command = [sys.executable, *runner_command(tmp_path, micro_model, argv, **kwargs)]
    stderr_path = tmp_path / f"stderr-{time.monotonic_ns()}.txt"
    with open(stderr_path, "w") as stderr:
        process = subprocess.Popen(
            command,
            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL, stderr=stderr,
            start_new_session=True,  # its own process group, as a job under a scheduler: killpg reaches its workers
        )
    process.stderr_path = stderr_path
    return process


def _read_stderr(process: subprocess.Popen) -> str:
    return process.stderr_path.read_text()


def wait_for(condition, process: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert process.poll() is None, f"the run exited ({process.returncode}) before {what}: {_read_stderr(process)[-3000:]}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def logged_step(output_dir: Path) -> int:
    try:
        lines = (output_dir / "log.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):  # not yet written, or a line half-written
        return 0


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


# ------------------------------------------------------------------------------------------------ SIGKILL


def test_a_run_killed_at_any_step_resumes_to_the_same_bits(tmp_path, tiny_args, micro_model, tmp_path_factory):
    """SIGKILL the training process at three points (with a checkpoint every 2 steps the kill lands between
    checkpoints: the resumed run redoes steps; step 8 ends the first epoch), resume each with train.resume=latest:
    every step's lr and loss and the final weights are bit-identical to the uninterrupted run."""
    reference = reference_run(tiny_args, tmp_path_factory)
    for kill_after in (3, 8, 13):
        out = tmp_path / f"killed_after_{kill_after}"
        argv = tiny_args(out, *COMMON, "train.save_every=2")
        process = start_run(tmp_path, micro_model, argv)
        try:
            wait_for(lambda: logged_step(out) >= kill_after, process, f"step {kill_after}")
            os.killpg(process.pid, signal.SIGKILL)
            assert process.wait(timeout=30) == -signal.SIGKILL
        finally:
            stop(process)
        latest = find_latest(out / "checkpoints")
        assert latest is not None and latest != checkpoint(out, LAST), "killed too late to test anything"
        assert logged_step(out) < LAST

        train(tiny_args(out, *COMMON, "train.save_every=2", "train.resume=latest"))
        assert_same_run(out, reference)


# ------------------------------------------------------------------------------------------------ SIGTERM / SIGINT


class SignalAtStep3(MAETask):
    """The real MAE task; while computing step 3 the process receives a signal (as from a scheduler)."""

    signum = signal.SIGTERM

    def __init__(self, mask_ratio: float):
        super().__init__(mask_ratio)
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == 3:
            os.kill(os.getpid(), self.signum)
        return super().__call__(model, batch)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_sigterm_or_sigint_saves_the_step_and_exits_with_128_plus_the_signal(
    tmp_path, tiny_args, monkeypatch, capsys, signum, tmp_path_factory
):
    reference = reference_run(tiny_args, tmp_path_factory)
    monkeypatch.setattr(SignalAtStep3, "signum", signum)
    monkeypatch.setattr("pretrain.train_mae.MAETask", SignalAtStep3)
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    out = tmp_path / "run"
    argv = tiny_args(out, *COMMON, "train.save_every=100")

    assert main(argv) == 128 + signum  # 143 for SIGTERM, 130 for SIGINT
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert f"interrupted: {name} received: stopped after step 3 and saved {checkpoint(out, 3)}" in err
    assert "train.resume=latest" in err
    assert find_latest(out / "checkpoints") == checkpoint(out, 3)  # saved although save_every is 100
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]
    assert not (out / "reconstructions.png").exists()  # stopped: what follows training did not run
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # restored

    # The Trainer itself raises TrainingInterrupted (the command line turns it into the exit status).
    with pytest.raises(TrainingInterrupted) as raised:
        run_mae(load_config(MAEPretrainConfig, None, tiny_args(tmp_path / "direct", *COMMON)))
    assert (raised.value.step, raised.value.exit_code) == (3, 128 + signum)

    monkeypatch.setattr("pretrain.train_mae.MAETask", MAETask)
    train(tiny_args(out, *COMMON, "train.save_every=100", "train.resume=latest"))
    assert_same_run(out, reference)


def test_sigterm_to_the_process_group_saves_and_resumes_identically(tmp_path, tiny_args, micro_model, tmp_path_factory):
    """A scheduler's SIGTERM reaches every process of the job, the DataLoader worker included: the worker keeps
    serving, the run finishes its step, saves it, exits with 143 and resumes to the uninterrupted run's bits."""
    reference = reference_run(tiny_args, tmp_path_factory)
    out = tmp_path / "run"
    argv = tiny_args(out, *COMMON, "train.save_every=100", "data.num_workers=1")
    process = start_run(tmp_path, micro_model, argv)
    try:
        wait_for(lambda: logged_step(out) >= 5, process, "step 5")
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=60) == 143, _read_stderr(process)[-3000:]
    finally:
        stop(process)
    err = _read_stderr(process)
    stopped = logged_step(out)
    assert 5 <= stopped < LAST
    assert f"interrupted: SIGTERM received: stopped after step {stopped} and saved" in err, err[-3000:]
    assert find_latest(out / "checkpoints") == checkpoint(out, stopped)
    assert "Traceback" not in err

    train(tiny_args(out, *COMMON, "train.save_every=100", "train.resume=latest"))
    assert_same_run(out, reference)


@pytest.mark.parametrize("late", [False, True], ids=["read_at_once", "read_a_step_late"])
def test_a_signal_to_one_process_stops_every_process_after_the_same_step(tmp_path, tiny_args, micro_model, late):
    """2 processes (torchrun, gloo): only rank 1 receives SIGTERM, during step 2. The ranks agree on it in the
    step's all-reduce: both finish step 2, rank 0 saves it, both exit 143; nobody hangs in a collective. With the
    step flags read a step late (as on an accelerator; no log line in between), both stop after step 3 instead."""
    out = tmp_path / "run"
    argv = tiny_args(out, *COMMON, "train.save_every=100", *(["train.log_every=100"] if late else []))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *runner_command(tmp_path, micro_model, argv, delay=0.0, signal_at="1:2")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **({"CHECKS_READ_LATE": "1"} if late else {})}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    stopped = 3 if late else 2
    assert result.returncode != 0  # torchrun reports its workers' status 143 as a failure
    assert result.stderr.count(f"interrupted: SIGTERM received: stopped after step {stopped} and saved") == 2, \
        result.stderr[-3000:]
    assert "exitcode  : 143" in result.stderr  # torchrun's failure summary
    if not late:
        assert [r["step"] for r in read_log(out)] == [1, 2]  # 64 images / global batch 16: 4 steps in an epoch
    assert find_latest(out / "checkpoints") == checkpoint(out, stopped)
    assert load_train_state(checkpoint(out, stopped))["world_size"] == 2


def signal_is_caught(pid: int, signum: int) -> bool:
    """Whether `pid` has a handler installed for `signum` (the SigCgt mask in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return False


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/PID/status")
def test_a_second_signal_stops_at_once_without_saving(tmp_path, tiny_args, micro_model):
    """A step that hangs: the first SIGTERM would save after it, which never comes; a second one ends the process
    at once (the default action), writing nothing more."""
    out, hanging = tmp_path / "run", tmp_path / "hanging"
    argv = tiny_args(out, "train.save_every=1")
    process = start_run(tmp_path, micro_model, argv, delay=0.0, hang_at=3, marker=hanging)
    try:
        wait_for(hanging.exists, process, "the hanging step")
        assert signal_is_caught(process.pid, signal.SIGTERM)
        os.kill(process.pid, signal.SIGTERM)
        # the first signal is handled: the handlers fall back to the default action
        wait_for(lambda: not signal_is_caught(process.pid, signal.SIGTERM), process, "the first signal's handler")
        start = time.monotonic()
        os.kill(process.pid, signal.SIGTERM)
        assert process.wait(timeout=30) == -signal.SIGTERM
        assert time.monotonic() - start < 10
    finally:
        stop(process)
    assert find_latest(out / "checkpoints") == checkpoint(out, 2)  # nothing saved for the hanging step


# ------------------------------------------------------------------------------------------------ damaged checkpoints


def test_damaged_checkpoints_are_detected_and_resume_latest_falls_back(tmp_path, tiny_args, capsys, caplog,
                                                                        tmp_path_factory):
    reference = reference_run(tiny_args, tmp_path_factory)
    out = tmp_path / "run"
    train(tiny_args(out, *COMMON, "train.save_every=2", "train.keep_last=10", "train.stop_after_steps=6"))
    step2, step4, step6 = checkpoint(out, 2), checkpoint(out, 4), checkpoint(out, 6)
    meta = json.loads((step6 / META_FILE).read_text())
    assert meta["files"][MODEL_FILE] == {"bytes": (step6 / MODEL_FILE).stat().st_size,
                                         "sha256": sha256_of(step6 / MODEL_FILE)}  # `sha256sum` prints the same
    # step 6: its weights file truncated (a copy cut short); step 4: one bit of its train state flipped (bad disk)
    with open(step6 / MODEL_FILE, "r+b") as f:
        f.truncate(f.seek(0, 2) // 2)
    data = bytearray((step4 / STATE_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (step4 / STATE_FILE).write_bytes(bytes(data))

    # Loading a damaged file is a clear error naming it.
    with pytest.raises(CheckpointError, match=r"step_00000006/model\.safetensors has \d+ bytes, \d+ when saved"):
        read_weights(step6)
    with pytest.raises(CheckpointError, match=r"train_state\.pt does not match the sha256 recorded"):
        resolve_resume(str(step4), out / "checkpoints")
    assert not is_complete(step6) and is_complete(step4)  # the cheap check sees the size; the digest needs a read
    # resume=PATH of a damaged checkpoint stops before training, naming it
    assert main(tiny_args(tmp_path / "other", *COMMON, f"train.resume={step6}")) == 2
    line = error_line(capsys)
    assert "damaged" in line and str(step6) in line and "truncated" in line

    # resume=latest passes over both, warning about each, and continues from step 2 to the uninterrupted run's bits.
    with caplog.at_level(logging.WARNING, logger="pretrain.checkpoint"):
        assert resolve_resume("latest", out / "checkpoints") == step2
        train(tiny_args(out, *COMMON, "train.save_every=2", "train.keep_last=10", "train.resume=latest"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(step6) in w and "truncated" in w for w in warnings), warnings
    assert any(str(step4) in w and "sha256" in w for w in warnings), warnings
    assert "resumed from" not in " ".join(warnings)
    assert_same_run(out, reference)
    assert resolve_resume("latest", out / "checkpoints") == checkpoint(out, LAST)
    resolve_resume(str(step4), out / "checkpoints")  # rewritten by the resumed run: it verifies again


# ------------------------------------------------------------------------------------------------ non-finite steps


class Diverging(MAETask):
    """The real MAE task, with a non-finite loss ("loss") or a finite loss whose gradient is NaN ("gradient") at the
    optimizer steps listed in `faults` (one call per step: no accumulation)."""

    faults: dict[int, str] = {}

    def __init__(self, mask_ratio: float):
        super().__init__(mask_ratio)
        self.calls = 0

    def __call__(self, model, batch):
        outputs = super().__call__(model, batch)
        self.calls += 1
        fault = self.faults.get(self.calls)
        if fault == "loss":
            outputs["loss"] = outputs["loss"] * float("nan")
        elif fault == "gradient":
            loss = outputs["loss"].clone()
            loss.register_hook(lambda grad: grad * float("nan"))  # the value stays finite, the backward pass not
            outputs["loss"] = loss
        return outputs


def test_a_non_finite_gradient_stops_naming_the_step_and_the_cause(tmp_path, tiny_args, monkeypatch, capsys):
    monkeypatch.setattr(Diverging, "faults", {3: "gradient"})
    monkeypatch.setattr("pretrain.train_mae.MAETask", Diverging)
    out = tmp_path / "run"
    assert main(tiny_args(out, "train.save_every=1")) == 3
    line = error_line(capsys)
    assert "non-finite gradient (grad norm nan; the loss " in line and "was finite) at step 3 (epoch 0.38)" in line
    assert f"The last good checkpoint is {checkpoint(out, 2)}." in line
    assert find_latest(out / "checkpoints") == checkpoint(out, 2)
    assert all(torch.isfinite(w).all() for w in load_file(checkpoint(out, 2) / MODEL_FILE).values())


def test_the_skip_budget_skips_and_counts_non_finite_steps_then_stops(tmp_path, tiny_args, monkeypatch, capsys):
    monkeypatch.setattr(Diverging, "faults", {3: "loss", 5: "gradient"})
    monkeypatch.setattr("pretrain.train_mae.MAETask", Diverging)
    out = tmp_path / "run"
    train(tiny_args(out, "train.save_every=1", "train.keep_last=100", "train.log_every=1",
                    "train.max_nonfinite_skips=2"))
    records = read_log(out)
    assert [r["nonfinite_skips"] for r in records] == [0, 0, 1, 1, 2, 2, 2, 2]
    assert math.isnan(records[2]["loss"]) and math.isnan(records[4]["loss"])  # no update in the logged window
    assert all(math.isfinite(r["loss"]) for i, r in enumerate(records) if i not in (2, 4))
    # a skipped step leaves the weights as they were; the run still moves on to the next batch and ends at step 8
    assert_same_weights(checkpoint(out, 3), checkpoint(out, 2))
    assert_same_weights(checkpoint(out, 5), checkpoint(out, 4))
    assert load_train_state(checkpoint(out, 8))["nonfinite_skips"] == 2
    assert all(torch.isfinite(w).all() for w in load_file(checkpoint(out, 8) / MODEL_FILE).values())

    # The budget is counted over the run, resumes included: 1 allowed, the second fault (a gradient) stops it.
    out = tmp_path / "stopped"
    monkeypatch.setattr(Diverging, "faults", {3: "loss"})
    train(tiny_args(out, "train.max_nonfinite_skips=1", "train.stop_after_steps=4", "train.log_every=1"))
    monkeypatch.setattr(Diverging, "faults", {1: "gradient"})  # the resumed run's first step: step 5
    assert main(tiny_args(out, "train.max_nonfinite_skips=1", "train.resume=latest")) == 3
    line = error_line(capsys)
    assert "non-finite gradient" in line and "at step 5 " in line and "train.max_nonfinite_skips=1 already spent" in line
    assert f"The last good checkpoint is {checkpoint(out, 4)}." in line


def test_checks_read_a_step_late_change_nothing(tmp_path, tiny_args, monkeypatch, capsys):
    """On an accelerator the host reads each step's non-finite / signal flags one step late (no device sync per
    step) while fused AdamW skips a bad update on the device. Forced here on the CPU: the same weights, optimizer
    state, skip count and log lines as reading at once; the flags were read late between log lines; and a spent
    budget still names the step that was bad."""
    import pretrain.engine as engine

    monkeypatch.setattr(Diverging, "faults", {3: "loss", 6: "gradient"})
    monkeypatch.setattr("pretrain.train_mae.MAETask", Diverging)
    settled = []  # (step, checks left unread) after each reading in the loop
    settle = engine.Trainer._settle_checks

    def spy(self, keep=0):
        finite = settle(self, keep)
        settled.append((self.step, len(self._pending_checks)))
        return finite

    monkeypatch.setattr(engine.Trainer, "_settle_checks", spy)
    args = ("train.save_every=4", "train.log_every=4", "train.max_nonfinite_skips=2")
    at_once, late = tmp_path / "at_once", tmp_path / "late"
    train(tiny_args(at_once, *args))
    assert all(left == 0 for _, left in settled)
    monkeypatch.setattr(engine, "checks_read_late", lambda device: 1)
    settled.clear()
    train(tiny_args(late, *args))
    assert (2, 1) in settled and (4, 0) in settled  # step 3's flags were read after step 4's update

    for step in (4, 8):  # tiny_args: 8 steps
        assert_same_weights(checkpoint(late, step), checkpoint(at_once, step))
        late_state, at_once_state = load_train_state(checkpoint(late, step)), load_train_state(checkpoint(at_once, step))
        assert late_state["nonfinite_skips"] == at_once_state["nonfinite_skips"] == (1 if step == 4 else 2)
        for a, b in zip(late_state["optimizer"]["state"].values(), at_once_state["optimizer"]["state"].values()):
            assert all(torch.equal(a[k], b[k]) for k in a)
    drop_timing = lambda records: [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]
    assert drop_timing(read_log(late)) == drop_timing(read_log(at_once))

    out = tmp_path / "spent"
    assert main(tiny_args(out, "train.save_every=4", "train.log_every=4")) == 3
    line = error_line(capsys)
    assert "non-finite loss (nan) at step 3 (epoch" in line
    assert not (out / "checkpoints" / "step_00000004").exists()


def test_skip_budget_must_not_be_negative():
    from pretrain.config import ConfigError

    with pytest.raises(ConfigError, match="'train.max_nonfinite_skips' must be >= 0, got -1"):
        load_config(MAEPretrainConfig, None, ["train.max_nonfinite_skips=-1"])


# ------------------------------------------------------------------------------------------------ malicious pickles


class RunsCode:
    """What an attacker puts in a .pth: unpickling it calls os.system, which creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def write_malicious(path: Path, marker: Path, legacy: bool) -> Path:
    payload = {"model": {"weight": torch.zeros(2)}, "extra": RunsCode(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)  # legacy: torch < 1.6's pickle stream
    return path


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy_pickle"])
def test_a_weights_file_that_would_run_code_is_refused(tmp_path, tiny_args, capsys, legacy):
    from pretrain.models import load_official_mae_checkpoint

    marker = tmp_path / "pwned"
    evil = write_malicious(tmp_path / "mae_pretrain_vit_base.pth", marker, legacy)
    # The attack works on a plain torch.load: the proof that the file is really malicious.
    control = write_malicious(tmp_path / "control.pth", tmp_path / "control_marker", legacy)
    torch.load(control, weights_only=False)
    assert (tmp_path / "control_marker").exists()

    loaders = {
        "load_torch_file": load_torch_file,
        "read_weights": read_weights,
        "official MAE weights": lambda p: load_official_mae_checkpoint(create_model("mae_vit_tiny_patch4"), p),
    }
    for what, load in loaders.items():
        with pytest.raises(CheckpointError) as raised:
            load(evil)
        message = str(raised.value)
        assert f"refusing to load {evil}" in message and "would import or run code" in message, what
        assert not marker.exists(), what
    if not legacy:
        assert "posix.system" in message  # torch's reason: the global it refused

    # A checkpoint directory whose train state was replaced (its meta.json updated to match): resume refuses it.
    out = tmp_path / "run"
    train(tiny_args(out, "train.stop_after_steps=1"))
    step1 = checkpoint(out, 1)
    write_malicious(step1 / STATE_FILE, marker, legacy)
    meta = json.loads((step1 / META_FILE).read_text())
    meta["files"][STATE_FILE] = {"bytes": (step1 / STATE_FILE).stat().st_size, "sha256": sha256_of(step1 / STATE_FILE)}
    (step1 / META_FILE).write_text(json.dumps(meta))
    assert main(tiny_args(tmp_path / "resumed", f"train.resume={step1}")) == 2
    line = error_line(capsys)
    assert f"refusing to load {step1 / STATE_FILE}" in line
    assert not marker.exists()


def test_plain_torch_weights_files_still_load(tmp_path):
    state = {"weight": torch.arange(4.0), "bias": torch.zeros(2)}
    torch.save({"model": state, "epoch": 3, "args": {"lr": 1e-3}}, tmp_path / "official.pth")
    loaded, metadata = read_weights(tmp_path / "official.pth")
    assert metadata == {}
    assert loaded.keys() == state.keys() and torch.equal(loaded["weight"], state["weight"])
    (tmp_path / "broken.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(CheckpointError, match=r"broken\.pt is damaged or not a torch file"):
        load_torch_file(tmp_path / "broken.pt")


# ------------------------------------------------------------------------------------------------ mismatched checkpoints


def test_a_checkpoint_that_does_not_fit_the_model_lists_the_keys(tmp_path, tiny_args, micro_model, capsys):
    base = MODEL_REGISTRY[micro_model]
    register_model("mae_test_micro_wide", lambda **kw: base(**{"embed_dim": 48, **kw}))
    register_model("mae_test_micro_deep", lambda **kw: base(**{"depth": 2, **kw}))
    source = tmp_path / "source"
    train(tiny_args(source, "train.stop_after_steps=1"))
    step1 = checkpoint(source, 1)

    assert main(tiny_args(tmp_path / "wide", "model.name=mae_test_micro_wide", f"train.resume={step1}")) == 2
    line = error_line(capsys)
    assert f"checkpoint {step1} does not fit the model (MaskedAutoencoderViT)" in line
    assert "shape mismatch" in line and "patch_embed.proj.weight: checkpoint (32, 3, 4, 4) vs model (48, 3, 4, 4)" in line

    assert main(tiny_args(tmp_path / "deep", "model.name=mae_test_micro_deep", f"train.resume={step1}")) == 2
    line = error_line(capsys)
    assert "missing (" in line and "blocks.1.attn.qkv.weight" in line and "shape mismatch" not in line

    model = MaskedAutoencoderViT(**create_model(micro_model).config)
    state = {**model.state_dict(), "head.weight": torch.zeros(3)}
    del state["decoder_norm.bias"]
    with pytest.raises(CheckpointError, match=r"missing \(1\): decoder_norm\.bias; unexpected \(1\): head\.weight"):
        load_state_dict_checked(model, state, "somewhere.safetensors")
