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
