"""A tiny open_clip model config for the CLIP tests (a JSON file, as users give their own configs)."""
from __future__ import annotations

import json
from pathlib import Path

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 16, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_tiny_clip_config(directory: Path, name: str = "test-tiny-clip") -> Path:
    path = Path(directory) / f"{name}.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


def train_tiny_clip(out: Path, config: Path, pair_shards: Path, steps: int = 3) -> Path:
    """A few steps of the tiny CLIP (`config`) on `pair_shards` through `python -m pretrain`, into `out`."""
    from accelerate.state import AcceleratorState, GradientState

    from pretrain.cli import main

    repo = Path(__file__).resolve().parents[1]
    code = main(["--config", str(repo / "configs" / "clip_vit_tiny_demo.yaml"), f"output_dir={out}",
                 f"model.open_clip_config={config}", f"data.train={pair_shards}", "data.image_size=16",
                 "data.num_workers=0", "data.shuffle_buffer=16", "train.batch_size=16", "train.epochs=1",
                 f"train.stop_after_steps={steps}", "train.log_every=1", "train.mixed_precision=no",
                 "logging.wandb=disabled", "logging.progress_bar=false"])
    assert code == 0
    # accelerate keeps one process-wide state: reset it for the runs that follow (see conftest.fresh_accelerate_state)
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return out
