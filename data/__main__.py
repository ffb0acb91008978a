"""Write WebDataset shards from the command line: labelled images, image-text pairs or COCO detection data.

    python -m data idx --images train-images-idx3-ubyte.gz --labels train-labels-idx1-ubyte.gz --out shards/
    python -m data folder --root photos/ --out shards/ --val-fraction 0.1
    python -m data manifest --file labels.csv --out shards/
    python -m data embedded --out shards/ --val-fraction 0.1
    python -m data pairs --manifest captions.csv --out shards/ --workers 4      (columns path,caption)
    python -m data pairs --folder img2dataset_out/ --out shards/ --resize-shorter 256
    python -m data coco --annotations instances_val2017.json --images val2017/ --out shards/
    python -m data captions --shards shards/fmnist/train --out shards/fmnist_pairs  (labelled -> image-text)

With --val-fraction 0 (the default) all samples go to OUT/train-NNNNNN.tar; otherwise to OUT/train/ and OUT/val/.
Images are stored as they are unless --resize-shorter or --jpeg-quality asks for a JPEG re-encoding.

OUT must be new or empty; --overwrite replaces the shards an earlier run wrote there (other files stay). While a
run writes, each output directory holds an INCOMPLETE file; a run that is killed or fails leaves it behind.
Bad input ends with one `error:` line and exit status 2; writing no sample at all is such an error too.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

from .captions import CAPTION_RECIPE, captioned_pairs
from .detection import read_coco, write_detection_shards
from .embedded import read_embedded
from .errors import DataError
from .images import ImageOptions
from .pairs import read_pair_folder, read_pair_manifest, write_pair_shards
from .shards import expand_shards, read_class_names
from .sources import read_idx, read_image_folder, read_manifest
from .writer import INCOMPLETE_FILE, STATS_FILE, ShardOptions, WrittenShards, write_labelled_shards


def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory for the shards and stats.json")
    common.add_argument("--val-fraction", type=float, default=0.0,
                        help="fraction held out in OUT/val (0: write everything to OUT)")
    common.add_argument("--seed", type=int, default=0, help="seed of the train/val split")
    common.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    common.add_argument("--max-shard-bytes", type=int, default=None, help="optional size limit per shard")
    common.add_argument("--resize-shorter", type=int, default=None, metavar="N",
                        help="shrink images so that the shorter side is N pixels (stored as JPEG)")
    common.add_argument("--jpeg-quality", type=int, default=None, metavar="Q",
                        help="re-encode images as JPEG of quality Q (1..95)")
    common.add_argument("--workers", type=int, default=0,
                        help="threads checking and encoding images (0: in the main thread); same output")
    common.add_argument("--strict", action="store_true", help="fail on the first sample that would be skipped")
    common.add_argument("--overwrite", action="store_true",
                        help="write into an OUT that holds files, replacing the shards an earlier run wrote there")
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
    pairs = commands.add_parser("pairs", parents=[common], help="image-text pairs")
    pairs_input = pairs.add_mutually_exclusive_group(required=True)
    pairs_input.add_argument("--manifest", help="CSV, TSV or JSONL with columns path,caption (or image,text)")
    pairs_input.add_argument("--folder", help="img2dataset-style folder: 0000.jpg + 0000.txt, in sub-folders too")
    captions = commands.add_parser("captions", parents=[common],
                                   help="image-text pairs from labelled shards, captions written from class names")
    captions.add_argument("--shards", required=True, help="labelled shards (with their stats.json)")
    coco = commands.add_parser("coco", parents=[common], help="COCO-format detection annotations + images")
    coco.add_argument("--annotations", required=True, help="COCO annotation JSON (images, annotations, categories)")
    coco.add_argument("--images", required=True, help="folder the images' file_name entries are relative to")
    return parser


def _read_labelled(args):
    if args.command == "idx":
        classes = args.classes
        if classes is not None and len(classes) == 1 and "," in classes[0]:
            classes = [c.strip() for c in classes[0].split(",")]
        return read_idx(args.images, args.labels, class_names=classes)
    if args.command == "folder":
        if Path(args.out).resolve().is_relative_to(Path(args.root).resolve()):  # it would become a class
            raise DataError(f"--out {args.out} lies inside --root {args.root}: choose an output outside the image "
                            f"folder, whose sub-folders are the classes")
        return read_image_folder(args.root)
    if args.command == "manifest":
        return read_manifest(args.file)
    return read_embedded()


def _write(args, options: ShardOptions) -> list[WrittenShards]:
    """Write the shards the arguments ask for."""
    every_kind = dict(val_fraction=args.val_fraction, seed=args.seed, options=options)
    if args.command == "pairs":
        pairs = read_pair_manifest(args.manifest) if args.manifest else read_pair_folder(args.folder)
        return write_pair_shards(pairs, args.out, **every_kind)
    if args.command == "captions":
        shards = expand_shards(args.shards)
        out = Path(args.out).resolve()
        inside = next((shard for shard in shards if Path(shard).resolve().is_relative_to(out)), None)
        if inside is not None:  # --overwrite would delete the shards being read
            raise DataError(f"--out {args.out} holds the input shard {inside}: write the pairs elsewhere")
        pairs = captioned_pairs(shards, read_class_names(shards), seed=args.seed)
        return write_pair_shards(pairs, args.out, metadata={"captions": CAPTION_RECIPE}, **every_kind)
    if args.command == "coco":
        categories, images = read_coco(args.annotations, args.images)
        return write_detection_shards(images, args.out, categories, **every_kind)
    class_names, samples = _read_labelled(args)
    return write_labelled_shards(samples, args.out, class_names, **every_kind)


def _summary(out: str, written: WrittenShards) -> str:
    stats = written.stats
    relative = written.directory.relative_to(out)
    name = out if relative == Path(".") else f"{out}/{relative.as_posix()}"  # as typed: OUT, OUT/train, OUT/val
    skipped = ", ".join(f"{reason}={n}" for reason, n in stats["skipped"].items()) or "none"
    what = ""
    if "classes" in stats:
        what = f"{len(stats['classes'])} classes, "
    elif "categories" in stats:
        what = f"{stats['boxes']} boxes in {len(stats['categories'])} categories, "
    elif "caption_words" in stats:
        what = f"captions of {stats['caption_words']['mean']:.1f} words on average, "
    dropped = "".join(f", dropped {reason}={n}" for reason, n in stats["dropped"].items())
    pixels = ""
    if "pixel_mean" in stats:  # what data.mean / data.std should be to train on these images from scratch
        pixels = f", pixel mean {stats['pixel_mean']} std {stats['pixel_std']}"
    return (f"{name}: {stats['samples']} samples in {len(stats['shards'])} shard(s), "
            f"{what}{stats['bytes'] / 1e6:.1f} MB{pixels}, skipped: {skipped}{dropped}")


def _source(args) -> str:
    """The input the arguments name, for messages."""
    for name in ("annotations", "images", "root", "file", "manifest", "folder", "shards"):
        if getattr(args, name, None):
            return getattr(args, name)
    return "the embedded Fashion-MNIST images"


def _nothing_written(args, written: WrittenShards) -> str:
    stats = written.stats
    skipped = sum(stats["skipped"].values())
    if not skipped:
        return f"{written.directory}: no samples written: {_source(args)} holds none"
    reasons = ", ".join(f"{reason}={n}" for reason, n in stats["skipped"].items())
    example = stats["skipped_examples"][0]
    return (f"{written.directory}: no samples written: all {skipped} of {_source(args)} were skipped ({reasons}; "
            f"e.g. {example['source']}: {example['message']}); see {written.directory / STATS_FILE}")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if (args.shard_size < 1 or not 0.0 <= args.val_fraction < 1.0 or args.workers < 0
                or (args.max_shard_bytes is not None and args.max_shard_bytes < 1)):
            raise DataError(f"--shard-size and --max-shard-bytes must be >= 1, --val-fraction in [0, 1) and "
                            f"--workers >= 0 (got {args.shard_size}, {args.max_shard_bytes}, {args.val_fraction}, "
                            f"{args.workers})")
        try:
            image_options = ImageOptions(args.resize_shorter, args.jpeg_quality)
        except ValueError as error:
            raise DataError(f"--resize-shorter/--jpeg-quality: {error}") from None
        options = ShardOptions(shard_size=args.shard_size, max_bytes=args.max_shard_bytes, strict=args.strict,
                               progress=not args.no_progress, workers=args.workers, image_options=image_options,
                               overwrite=args.overwrite)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*no valid samples were written")  # an error below
            written_directories = _write(args, options)
        for written in written_directories:
            if written.stats["samples"] == 0:
                raise DataError(_nothing_written(args, written))
            print(_summary(args.out, written))
    except (DataError, OSError) as error:  # OSError: an I/O failure no reader or writer put into words
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"error: interrupted; shards written under {args.out} stay marked by an {INCOMPLETE_FILE} file",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
