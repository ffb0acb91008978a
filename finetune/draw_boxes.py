"""Draw a DETR run's predicted boxes (red, with class and score) and the true boxes (green, dashed) on the first
validation images, as one PNG.

    python -m finetune.draw_boxes runs/bench_detr/detr                     # best/ weights, its config's data.val
    python -m finetune.draw_boxes runs/bench_detr/detr --weights last --out boxes_last.png --threshold 0.3

run_detr writes OUTPUT_DIR/boxes.png this way at the end of training (num_pictures, picture_threshold).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from data import detection_eval_transform, read_categories
from pretrain.cli import run_entry_point
from pretrain.config import load_config

from .config import DetrConfig
from .detection import detr_from_weights
from .pictures import draw_predictions


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m finetune.draw_boxes", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a DETR run directory (python -m finetune with task detr)")
    parser.add_argument("--weights", choices=("best", "last"), default="best")
    parser.add_argument("--shards", help="detection shards to draw from (default: the run config's data.val)")
    parser.add_argument("--out", help="PNG to write (default: RUN/boxes_<weights>.png)")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.5, help="draw predictions scoring at least this")
    args = parser.parse_args(argv)

    def body() -> None:
        run = Path(args.run)
        cfg = load_config(DetrConfig, str(run / "config.yaml"), [])
        model, _, weights_file = detr_from_weights(run / args.weights)
        transform = detection_eval_transform(cfg.augment.eval_size, cfg.augment.eval_max_size, cfg.data.mean,
                                             cfg.data.std)
        shards = args.shards or cfg.data.val
        names = {int(c["id"]): c["name"] for c in read_categories(shards)}
        out = draw_predictions(model, shards, transform, args.out or run / f"boxes_{args.weights}.png",
                               names, cfg.data.mean, cfg.data.std, args.num_images, args.threshold)
        print(f"{out}: predictions of {weights_file}")

    return run_entry_point(body)


if __name__ == "__main__":
    raise SystemExit(main())
