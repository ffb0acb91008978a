"""Command line of `python -m pretrain`, and the error handling every entry point shares."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from typing import Any, Callable, NoReturn, Sequence

import yaml

from .config import CLIPPretrainConfig, ConfigError, MAEPretrainConfig, load_config, read_yaml, to_dict

# objective name -> (config schema, run function path)
OBJECTIVES: dict[str, tuple[type, str]] = {
    "mae": (MAEPretrainConfig, "pretrain.train_mae:run_mae"),
    "clip": (CLIPPretrainConfig, "pretrain.train_clip:run_clip"),
}


def parse_args(prog: str, description: str, argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="Overrides are dotted key=value pairs, e.g. optim.base_lr=1e-3 train.epochs=2 output_dir=runs/x",
    )
    parser.add_argument("--config", help="YAML config file (default: the built-in CPU demo)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    return parser.parse_args(argv)


def peek_key(config_path: str | None, overrides: Sequence[str], key: str, default: str) -> Any:
    """Read one top-level key (e.g. `objective`) before the schema is known, to pick the schema."""
    value = read_yaml(config_path).get(key, default) if config_path else default
    for item in overrides:
        if item.startswith(f"{key}="):
            value = item.split("=", 1)[1]
    return value


def run_entry_point(body: Callable[[], Any]) -> int:
    """Run `body`, turning the errors a user can fix into one clear line and a non-zero exit status:
    2 configuration, data or checkpoint error; 3 the run diverged (non-finite loss or gradient); 128 + signal
    number (143 SIGTERM, 130 SIGINT) stopped by a signal after saving a checkpoint (train.resume=latest continues)."""
    from data.errors import DataError
    from .checkpoint import CheckpointError
    from .engine import NonFiniteLossError, TrainingInterrupted

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("PIL", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        body()
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return 2
    except NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    except TrainingInterrupted as err:
        print(f"interrupted: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    close_process_group()
    return 0


def close_process_group() -> None:
    """Destroy the process group a multi-process run set up, once every process is done with it. Left to the
    interpreter's exit, gloo's worker threads are torn down in an arbitrary order and a finished run can still die
    with SIGABRT ("terminate called without an active exception")."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


EXIT_GRACE_S = 30  # after a failure, the most the interpreter's own exit may take before the process is ended


def exit_with(main: Callable[[], int]) -> NoReturn:
    """The body of `python -m pretrain/finetune`: run `main` and exit with its status. After a failure (a non-zero
    status, an uncaught exception) the exit is bounded, a last line of defence: whatever still holds the interpreter
    at exit (a data worker that does not stop, a thread someone joins) cannot keep a failed run alive."""
    try:
        code = main()
    except BaseException:
        _end_process_after(EXIT_GRACE_S, 1)
        raise
    if code:
        _end_process_after(EXIT_GRACE_S, code)
    sys.exit(code)


def _end_process_after(seconds: float, code: int) -> None:
    def end() -> None:
        print(f"error: still exiting {seconds:g} s after the run stopped; ending the process", file=sys.stderr)
        sys.stderr.flush()
        os._exit(code)

    timer = threading.Timer(seconds, end)
    timer.daemon = True  # runs beside the interpreter's exit, which waits for non-daemon threads only
    timer.start()


def one_line(err: Exception) -> str:
    """The error's own message. An error raised in a DataLoader worker arrives wrapped in the worker's traceback
    ("Caught DataError in DataLoader worker process 0. Original Traceback ..."): keep its last line only."""
    text = str(err).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]  # "data.errors.DataError: <message>"
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def import_run(path: str) -> Callable:
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def dispatch(args: argparse.Namespace, key: str, default: str, table: dict[str, tuple[type, str]]) -> None:
    """Pick the schema and run function by the config's `key` (objective or task), validate, then run."""
    name = peek_key(args.config, args.overrides, key, default)
    if name not in table:
        raise ConfigError(f"unknown {key} '{name}' (known: {', '.join(table)})")
    schema, run_path = table[name]
    config = load_config(schema, args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(to_dict(config), sort_keys=False), end="")
        return
    import_run(run_path)(config)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args("python -m pretrain", "Self-supervised pretraining (MAE, UM-MAE, SimMIM, CLIP).", argv)
    return run_entry_point(lambda: dispatch(args, "objective", "mae", OBJECTIVES))
