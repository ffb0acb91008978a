"""The results picture of docs/benchmarks.md: every method of the Fashion-MNIST benchmarks against its baselines
and its target, one group of bars per row, drawn from the `summary` the benchmark scripts write into their JSON.

    python benchmarks/results_chart.py docs/results/*.json --out docs/results/fashion_mnist.png

It also prints each file's recorded wall time (the `seconds` of each step, as the scripts measured them, on
whatever machine and load they ran), their sum (one whole run's time when the files come from one run of
benchmarks/fmnist_all.sh, each step recorded by the script that ran it) and the hours on each kind of machine
(the files' `machines`: each stretch of each step, with the CPU and its matmul rate then).

A summary row: {"row": "MAE, linear probe", "metric": "top-1 (%)", "value": 88.1, "target": 88,
"baselines": {"raw pixels": 85.4, "random init": 72.6}}; a target taken from a baseline also has a "target_label"
(e.g. "no distillation + 1").
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from machine import kind_in_words, rates_in_words

METHOD_COLOUR, BASELINE_COLOURS, TARGET_COLOUR = "#1f77b4", ("#bbbbbb", "#888888", "#555555"), "#d62728"


def read_summaries(paths: list[Path]) -> list[dict]:
    """Every summary row of the given benchmark JSON files, in file order; a file without one is skipped, said."""
    rows = []
    for path in paths:
        summary = json.loads(path.read_text()).get("summary")
        if not summary:
            print(f"{path}: no summary rows, left out", file=sys.stderr)
            continue
        rows.extend(summary)
    return rows


def wall_times(paths: list[Path]) -> list[str]:
    """A markdown table of each file's steps' recorded wall seconds, in hours, the total, and where they ran: the
    hours on each kind of machine the steps' stretches recorded (benchmarks/machine.py), with the range of its
    measured matmul rates; time from before machines were recorded is "not recorded"."""
    lines = ["| results | steps | wall time (h) | where (h) |", "|---|---:|---:|---|"]
    total, everywhere = 0.0, {}
    for path in paths:
        results = json.loads(path.read_text())
        seconds = results.get("seconds") or {}
        where = machine_seconds(seconds, results.get("machines") or {})
        for kind, (kind_seconds, machines) in where.items():
            add_seconds(everywhere, kind, kind_seconds, machines)
        file_total = sum(seconds.values())
        total += file_total
        hours = f"{file_total / 3600:.2f}" if seconds else "not recorded"
        lines.append(f"| {path.name} | {len(seconds)} | {hours} | {where_in_words(where)} |")
    lines.append(f"| all | | **{total / 3600:.2f}** | {where_in_words(everywhere)} |")
    return lines


NOT_RECORDED = "not recorded"


def machine_seconds(seconds: dict[str, float], machines: dict[str, list[dict]]) -> dict[str, tuple[float, list]]:
    """{machine kind: (seconds, the machines measured)} over the steps' stretches; the part of a step's seconds
    that no stretch accounts for (timed before machines were recorded) under NOT_RECORDED."""
    where: dict[str, tuple[float, list]] = {}
    for step, step_seconds in seconds.items():
        stretches = machines.get(step, [])
        for stretch in stretches:
            add_seconds(where, kind_in_words(stretch["machine"]), stretch["seconds"], [stretch["machine"]])
        unaccounted = step_seconds - sum(stretch["seconds"] for stretch in stretches)
        if unaccounted > 1.0:
            add_seconds(where, NOT_RECORDED, unaccounted, [])
    return where


def add_seconds(where: dict[str, tuple[float, list]], kind: str, spent: float, machines: list[dict]) -> None:
    """Add `spent` seconds on `machines` to `where`'s entry for `kind`."""
    kind_seconds, kind_machines = where.get(kind, (0.0, []))
    where[kind] = (kind_seconds + spent, kind_machines + machines)


def where_in_words(where: dict[str, tuple[float, list]]) -> str:
    """'AMD EPYC, 2 cores, avx512_bf16 (bf16 matmul 335-396 GFLOP/s): 1.20; not recorded: 0.30'."""
    parts = [f"{kind} ({rates_in_words(machines)}): {spent / 3600:.2f}" if machines else f"{kind}: {spent / 3600:.2f}"
             for kind, (spent, machines) in sorted(where.items(), key=lambda item: item[0] == NOT_RECORDED)]
    return "; ".join(parts) or "-"


def target_text(row: dict) -> str:
    """"target 93", for a target set by a baseline "target 73.7 (no distillation + 1)", and ": missed" after
    either where the method's value is below it."""
    target = float(row["target"])
    text = f"target {target:g}" if target.is_integer() else f"target {target:.1f}"
    text = f"{text} ({row['target_label']})" if row.get("target_label") else text
    return f"{text}: missed" if row["value"] < target else text


def draw(rows: list[dict], out: Path) -> None:
    """Horizontal bars: per row the method (blue), its baselines (grey), the target (a red tick)."""
    bar, gap = 0.8, 0.6
    heights = [bar * (1 + len(row.get("baselines", {}))) + gap for row in rows]
    figure = Figure(figsize=(8, 0.9 + 0.32 * sum(heights) / bar), dpi=100)
    FigureCanvasAgg(figure)
    ax = figure.subplots()
    y, ticks, labels = 0.0, [], []
    for row, height in zip(rows, heights):
        entries = [(row["row"], row["value"], METHOD_COLOUR)] + [
            (name, value, BASELINE_COLOURS[i % len(BASELINE_COLOURS)])
            for i, (name, value) in enumerate(row.get("baselines", {}).items())]
        for offset, (name, value, colour) in enumerate(entries):
            position = y + offset * bar
            ax.barh(position, value, height=bar * 0.9, color=colour)
            ax.text(value, position, f" {value:.1f}", va="center", fontsize=7)
            ticks.append(position)
            labels.append(name if offset == 0 else f"    {name}")
        if row.get("target") is not None:
            top, bottom = y - bar / 2, y + (len(entries) - 0.5) * bar
            ax.plot([row["target"]] * 2, [top, bottom], color=TARGET_COLOUR, linewidth=2)
            # ending at the tick, so that a target near the right edge keeps its whole label
            ax.text(row["target"], top, target_text(row), color=TARGET_COLOUR, fontsize=7, va="bottom", ha="right")
        y += height
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("top-1 (%) / AP50 (%), held-out validation split of Fashion-MNIST's training set")
    ax.set_xlim(0, 105)
    ax.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, format="png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", nargs="+", type=Path, help="benchmark JSON files (written with --json)")
    parser.add_argument("--out", type=Path, default=Path("docs/results/fashion_mnist.png"))
    args = parser.parse_args(argv)
    missing = [str(path) for path in args.results if not path.is_file()]
    if missing:
        print(f"error: no such file: {', '.join(missing)}", file=sys.stderr)
        return 2
    rows = read_summaries(args.results)
    if not rows:
        print("error: none of the files holds summary rows (write them with the benchmarks' --json)", file=sys.stderr)
        return 2
    draw(rows, args.out)
    print(f"{len(rows)} rows drawn into {args.out}")
    print("\n".join(["", "Recorded wall time of every step:", *wall_times(args.results)]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
