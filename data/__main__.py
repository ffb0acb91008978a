"""Write labelled WebDataset shards from the command line.

    python -m data idx --images train-images-idx3-ubyte.gz --labels train-labels-idx1-ubyte.gz --out shards/
    python -m data folder --root photos/ --out shards/ --val-fraction 0.1
    python -m data manifest --file labels.csv --out shards/
    python -m data embedded --out shards/ --val-fraction 0.1

With --val-fraction 0 (the default) all samples go to OUT/train-NNNNNN.tar; otherwise to OUT/train/ and OUT/val/.
"""

from __future__ import annotations

import argparse
import sys

from .embedded import read_embedded
from .errors import DataError
from .sources import read_idx, read_image_folder, read_manifest
from .writer import write_labelled_shards, write_split


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory for the shards and stats.json")
    common.add_argument("--val-fraction", type=float, default=0.0,
                        help="fraction held out in OUT/val (0: write everything to OUT)")
    common.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    common.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    common.add_argument("--max-shard-bytes", type=int, default=None, help="optional size limit per shard")
    common.add_argument("--strict", action="store_true", help="fail on the first unreadable image")
    common.add_argument("--no-progress", action="store_true", help="no progress bar")

    parser = argparse.ArgumentParser(prog="python -m data", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    idx = commands.add_parser("idx", parents=[common], help="MNIST-style IDX image/label files")
    idx.add_argument("--images", required=True)
    idx.add_argument("--labels", required=True)
    idx.add_argument("--classes", nargs="+", default=None,
                     help="class names for label ids 0..K-1 (a comma-separated single value also works)")
    folder = commands.add_parser("folder", parents=[common], help="ROOT/<class name>/<image files>")
    folder.add_argument("--root", required=True)
    manifest = commands.add_parser("manifest", parents=[common], help="CSV (path,label) or JSONL manifest")
    manifest.add_argument("--file", required=True)
    commands.add_parser("embedded", parents=[common], help="the 3000 Fashion-MNIST images shipped in data/")
    return parser


def _read_source(args):
    if args.command == "idx":
        classes = args.classes
        if classes is not None and len(classes) == 1 and "," in classes[0]:
            classes = [c.strip() for c in classes[0].split(",")]
        return read_idx(args.images, args.labels, class_names=classes)
    if args.command == "folder":
        return read_image_folder(args.root)
    if args.command == "manifest":
        return read_manifest(args.file)
    return read_embedded()


def _summary(name: str, stats: dict) -> str:
    skipped = ", ".join(f"{reason}={n}" for reason, n in stats["skipped"].items()) or "none"
    return (f"{name}: {stats['samples']} samples in {len(stats['shards'])} shard(s), "
            f"{len(stats['classes'])} classes, {stats['bytes'] / 1e6:.1f} MB, skipped: {skipped}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    options = dict(shard_size=args.shard_size, max_bytes=args.max_shard_bytes, strict=args.strict,
                   progress=not args.no_progress)
    try:
        if args.shard_size < 1 or not 0.0 <= args.val_fraction < 1.0:
            raise DataError(f"--shard-size must be >= 1 and --val-fraction in [0, 1) "
                            f"(got {args.shard_size}, {args.val_fraction})")
        class_names, samples = _read_source(args)
        if args.val_fraction > 0:
            train, val = write_split(samples, args.out, class_names, args.val_fraction, args.seed, **options)
            print(_summary(f"{args.out}/train", train))
            print(_summary(f"{args.out}/val", val))
        else:
            print(_summary(args.out, write_labelled_shards(samples, args.out, class_names, **options)))
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
