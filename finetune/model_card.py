"""The README.md model card every export folder carries: what the model is, how it was pretrained and on what,
what it measured, and the exact lines that load it. Everything is read from what the run recorded (the weights'
metadata, config.yaml, the checkpoint's meta.json, the shards' stats.json, metrics.json of the run and of the
evaluations named with --eval); what is missing is said, never guessed."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Optional

import yaml

from data import DataError, read_shard_stats
from pretrain.run import EMBEDDED
from pretrain.checkpoint import META_FILE, recorded_normalisation

RUN_CONFIG = "config.yaml"
METRICS_FILE = "metrics.json"
OBJECTIVES = {
    "mae": "masked-image modelling (MAE / UM-MAE / SimMIM: reconstruct the pixels of masked patches)",
    "clip": "CLIP (image-text contrastive)",
    "finetune": "supervised finetuning (a classifier)",
}


@dataclass
class RunRecord:
    """What a run recorded about the weights being exported."""
    weights_file: Path
    run_dir: Optional[Path]
    objective: str
    model_name: str
    model_config: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)  # the run's config.yaml
    step: Optional[int] = None
    epoch: Optional[float] = None
    mixed_precision: Optional[str] = None  # what the checkpoint's run trained in ("auto" resolved)
    normalisation: Optional[tuple[tuple[float, ...], tuple[float, ...]]] = None
    data: dict[str, Any] = field(default_factory=dict)  # the training shards' stats.json, summarised
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)  # source -> scalar metrics


def read_run_record(weights_file: Path, metadata: dict[str, str], evals: list[str] = ()) -> RunRecord:
    """The record of the run that wrote `weights_file` (its checkpoint folder, then the run folder above it)."""
    run_dir = next((p for p in list(weights_file.parents)[:3] if (p / RUN_CONFIG).is_file()), None)
    config = yaml.safe_load((run_dir / RUN_CONFIG).read_text()) if run_dir else {}
    meta_file = weights_file.parent / META_FILE
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    record = RunRecord(
        weights_file=weights_file, run_dir=run_dir, objective=metadata.get("objective", "unknown"),
        model_name=metadata.get("model_name", ""), model_config=json.loads(metadata.get("model_config", "{}")),
        config=config or {}, step=meta.get("step"), epoch=meta.get("epoch"), mixed_precision=meta.get("mixed_precision"),
        normalisation=recorded_normalisation(weights_file) or _config_normalisation(config or {}),
    )  # fmt: skip
    record.data = _data_summary(config or {}, run_dir)
    for evaluation in evals:
        if not (Path(evaluation) / METRICS_FILE).is_file():
            raise ValueError(f"--eval {evaluation}: no {METRICS_FILE} there (an evaluation run's folder holds one)")
    sources = ([run_dir] if run_dir else []) + [Path(e) for e in evals]
    for source in sources:
        scalars = _scalar_metrics(source / METRICS_FILE)
        if scalars:
            record.metrics[str(source)] = scalars
    return record


def _config_normalisation(config: dict[str, Any]) -> Optional[tuple[tuple[float, ...], tuple[float, ...]]]:
    """data.mean / data.std of the run's config (runs before the weights' metadata recorded them)."""
    data = config.get("data") or {}
    if data.get("mean") is None or data.get("std") is None:
        return None
    return tuple(data["mean"]), tuple(data["std"])


def _data_summary(config: dict[str, Any], run_dir: Optional[Path]) -> dict[str, Any]:
    spec = (config.get("data") or {}).get("train")
    if spec is None:
        return {}
    if spec == EMBEDDED and run_dir is not None:  # written under the run (pretrain/run.py resolve_shards)
        cache = (config.get("data") or {}).get("cache_dir")
        spec = str((Path(cache) if cache else run_dir / "data") / "train")
    try:
        stats = read_shard_stats(spec)
    except (DataError, OSError, ValueError) as err:
        return {"shards": spec, "stats": f"not readable ({err})"}
    summary = {"shards": spec, "samples": stats.get("samples"), "shard files": len(stats.get("shards", []))}
    if stats.get("classes"):
        summary["classes"] = f"{len(stats['classes'])}: " + ", ".join(stats["classes"][:20]) + \
            (", ..." if len(stats["classes"]) > 20 else "")
    if "caption_lengths" in stats:
        summary["captions"] = "image-text pairs"
    skipped = sum((stats.get("skipped") or {}).values())
    summary["skipped when written"] = skipped
    for key in ("pixel_mean", "pixel_std"):
        if key in stats:
            summary[key] = [round(v, 4) for v in stats[key]]
    return summary


_RESULT_KEY = re.compile(r"top|acc|ap\b|ap50|ap75|recall|r@|knn|zero|loss", re.IGNORECASE)
_DESCRIPTION_KEYS = ("protocol", "feature")


def _scalar_metrics(path: Path) -> dict[str, Any]:
    """The results in a metrics.json (accuracies, AP, recall, losses; nested ones as "k/20/top1"), with what was
    measured ("what": the run's task and the metrics' description)."""
    if not path.is_file():
        return {}
    try:
        metrics = json.loads(path.read_text())
    except ValueError:
        return {}
    results = {k: v for k, v in _flatten(metrics).items()
               if _RESULT_KEY.search(k.rsplit("/", 1)[-1]) and not k.startswith(("num_", "best_"))}
    config_file = path.parent / RUN_CONFIG
    task = (yaml.safe_load(config_file.read_text()) or {}).get("task") if config_file.is_file() else None
    described = [f"task {task}"] if task else []
    described += [f"{k} {metrics[k]}" for k in _DESCRIPTION_KEYS if isinstance(metrics.get(k), str)]
    return {"what": ", ".join(described), **results} if results else {}


def _flatten(metrics: dict[str, Any], prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix + str(key)] = value
    return flat


def write_model_card(path: Path, record: RunRecord, *, folder: Path, title: str, library: str, command: str,
                     load_snippet: str, files: dict[str, str], parameters: Optional[int] = None) -> Path:
    """The card of export `folder`, written to `path` (its README.md, or one in the folder being filled), with
    Hugging Face Hub front matter (library, tags)."""
    objective = OBJECTIVES.get(record.objective, record.objective)
    lines = ["---", f"library_name: {library}", "tags:", "- vision", "- self-supervised", f"- {record.objective}",
             "- vitpretrain", "pipeline_tag: image-feature-extraction", "---", "", f"# {title}", "",
             f"Exported on {date.today().isoformat()} by:", "", "```bash", command, "```", "",
             f"from `{record.weights_file}`.", "", "## Files", "", "| file | what |", "| --- | --- |"]
    lines += [f"| `{name}` | {what} |" for name, what in files.items()]
    lines += ["", "## Model", "", f"- architecture: `{record.model_name or 'unnamed'}`"]
    if parameters is not None:
        lines.append(f"- parameters: {parameters / 1e6:.2f} M")
    if record.model_config:
        lines += ["- constructor arguments:", "", "```json", json.dumps(record.model_config, indent=1), "```"]
    lines += ["", "## Pretraining", "", f"- objective: {objective}"]
    model_cfg, train, optim = (record.config.get(k) or {} for k in ("model", "train", "optim"))
    if "mask_ratio" in model_cfg:
        lines.append(f"- mask ratio: {model_cfg['mask_ratio']}, "
                     f"normalised-pixel targets: {model_cfg.get('norm_pix_loss')}")
    if record.step is not None:
        epoch = f" ({record.epoch:g} epochs)" if record.epoch is not None else ""
        lines.append(f"- steps: {record.step}{epoch}")
    if train:
        precision = requested = train.get("mixed_precision")
        if record.mixed_precision is not None and record.mixed_precision != requested:
            precision = f"{requested} -> {record.mixed_precision}"
        lines.append(f"- batch: {train.get('batch_size')} per device x {train.get('grad_accum_steps', 1)} "
                     f"accumulation; mixed precision {precision}")
    if optim:
        lines.append(f"- optimizer: {optim.get('name')}, base lr {optim.get('base_lr')}, weight decay "
                     f"{optim.get('weight_decay')}")
    if record.normalisation is not None:
        mean, std = record.normalisation
        lines.append(f"- input normalisation: mean {list(mean)}, std {list(std)} (pixels scaled to [0, 1] first)")
    else:
        lines.append("- input normalisation: not recorded")
    if record.config:
        lines += ["", "<details><summary>the run's whole config</summary>", "", "```yaml",
                  yaml.safe_dump(record.config, sort_keys=False).rstrip(), "```", "", "</details>"]
    else:
        lines.append("- config: not found (no config.yaml beside the weights)")
    lines += ["", "## Data", ""]
    if record.data:
        lines += ["| | |", "| --- | --- |"] + [f"| {k} | {v} |" for k, v in record.data.items()]
    else:
        lines.append("Not recorded (the run's config names no training shards).")
    lines += ["", "## Evaluation", ""]
    if record.metrics:
        lines += ["| run | measured | results |", "| --- | --- | --- |"]
        for source, metrics in record.metrics.items():
            results = ", ".join(f"{k} {_fmt(v)}" for k, v in metrics.items() if k != "what")
            lines.append(f"| `{source}` | {metrics['what'] or '-'} | {results} |")
    else:
        lines.append("No metrics were found in the run (a run's metrics.json, or `--eval RUN` of a linear probe, "
                     "k-NN or zero-shot run).")
    lines += ["", "## Load it", "", load_snippet.strip(), "", "## Put it on the Hugging Face Hub", "",
              "```python", "from huggingface_hub import upload_folder", "",
              f'upload_folder(repo_id="YOUR_NAME/{folder.name}", folder_path="{folder}")', "```", ""]
    path.write_text("\n".join(lines))
    return path


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
