"""Detection data as WebDataset shards: read a COCO annotation file and its image folder, write one sample per
image, rebuild the COCO ground truth from the shards, and decode a stored sample back.

A stored sample is {"__key__", "<ext>": image bytes, "json": target}, the target being

    {"image_id": int, "file_name": str, "width": int, "height": int,
     "boxes": [[x, y, w, h], ...] (pixels of the stored image), "category_ids": [...], "annotation_ids": [...],
     "iscrowd": [...], "area": [...]}

stats.json lists the categories (id, name) so that `coco_ground_truth` can rebuild a COCO dict for evaluation.
Boxes with no area, or beyond the image by more than BOX_TOLERANCE pixels, are dropped and counted; images
without annotations are kept with empty lists. Resizing (ImageOptions.resize_shorter) scales boxes and areas.

    source = read_coco("instances_val2017.json", "val2017/")
    write_detection_shards(source.images, "shards/", source.categories, options=ShardOptions(workers=4))
    ground_truth = coco_ground_truth("shards/")
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import webdataset
from PIL import Image

from .errors import DataError
from .images import ImageOptions, SampleSkipped, decode_checked, decode_image, encode_for_shard, pixel_moments
from .sources import SizedIterable, _key_for, read_image_file
from .writer import STATS_FILE, Prepared, ShardOptions, Tally, WrittenShards, write_shards

BOX_TOLERANCE = 1.0  # pixels a box may stick out of its image (annotation tools round outwards)


@dataclass(frozen=True)
class CocoImage:
    """One COCO image entry and its annotations; the file is read when it is written (in a worker).

    width, height: as the annotation file states them (None if it does not).
    annotations: the COCO annotation dicts of this image, in file order.
    """

    key: str
    path: Path
    image_id: int
    file_name: str
    width: int | None
    height: int | None
    annotations: tuple[dict, ...]
    source: str


class CocoSource(NamedTuple):
    categories: list[dict]  # [{"id", "name"} (+ "supercategory" where given)], in file order
    images: SizedIterable  # of CocoImage


_KIND_NAMES = {int: "an integer", str: "a string", list: "a list"}


def _require(record, keys: dict[str, type], where: str) -> None:
    """record must be an object holding every key, each value of its type (bool is no integer); DataError if not."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object, got {str(record)[:80]}")
    missing = [k for k in keys if k not in record]
    if missing:
        raise DataError(f"{where}: missing {', '.join(missing)} in {str(record)[:120]}")
    for key, kind in keys.items():
        if not isinstance(record[key], kind) or isinstance(record[key], bool):
            raise DataError(f"{where}: {key} must be {_KIND_NAMES[kind]}, got {str(record[key])[:80]!r}")


def read_coco(annotations_file, images_dir) -> CocoSource:
    """Read a COCO-format annotation file; image `file_name`s resolve against `images_dir`.

    Malformed entries (missing keys, a value of the wrong type, a bbox that is not 4 finite numbers, an unknown
    image or category id, duplicate image or category ids) are a DataError naming the file and the entry.
    """
    annotations_file, images_dir = Path(annotations_file), Path(images_dir)
    try:
        coco = json.loads(annotations_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{annotations_file}: cannot read annotation file ({error})") from error
    except json.JSONDecodeError as error:
        raise DataError(f"{annotations_file}: not valid JSON ({error.msg} at line {error.lineno})") from error
    _require(coco, {"images": list, "categories": list}, str(annotations_file))
    if not isinstance(coco.get("annotations", []), list):
        raise DataError(f"{annotations_file}: annotations must be a list, got {str(coco['annotations'])[:80]!r}")
    if not images_dir.is_dir():
        raise DataError(f"{images_dir}: image folder does not exist or is not a directory")

    categories = []
    for index, category in enumerate(coco["categories"]):
        _require(category, {"id": int, "name": str}, f"{annotations_file}: categories[{index}]")
        if any(category["id"] == known["id"] for known in categories):
            raise DataError(f"{annotations_file}: categories[{index}]: duplicate category id {category['id']}")
        categories.append({k: category[k] for k in ("id", "name", "supercategory") if k in category})
    category_ids = {c["id"] for c in categories}

    images: dict[int, dict] = {}
    for index, image in enumerate(coco["images"]):
        where = f"{annotations_file}: images[{index}]"
        _require(image, {"id": int, "file_name": str}, where)
        for side in ("width", "height"):
            if side in image and not (isinstance(image[side], int) and not isinstance(image[side], bool)
                                      and image[side] > 0):
                raise DataError(f"{where} (id {image['id']}): {side} must be a positive integer, got {image[side]!r}")
        if image["id"] in images:
            raise DataError(f"{annotations_file}: images[{index}]: duplicate image id {image['id']}")
        images[image["id"]] = image

    by_image: dict[int, list[dict]] = {image_id: [] for image_id in images}
    for index, annotation in enumerate(coco.get("annotations", [])):
        where = f"{annotations_file}: annotations[{index}]"
        _require(annotation, {"id": int, "image_id": int, "category_id": int, "bbox": list}, where)
        bbox = annotation["bbox"]
        if not (len(bbox) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                       for v in bbox)):
            raise DataError(f"{where} (id {annotation['id']}): bbox must be 4 numbers [x, y, w, h], got {bbox!r}")
        if annotation["image_id"] not in images:
            raise DataError(f"{where} (id {annotation['id']}): unknown image_id {annotation['image_id']}")
        if annotation["category_id"] not in category_ids:
            raise DataError(f"{where} (id {annotation['id']}): unknown category_id {annotation['category_id']}")
        if annotation.get("iscrowd", 0) not in (0, 1):  # stored as is; training would skip every such image
            raise DataError(f"{where} (id {annotation['id']}): iscrowd must be 0 or 1, got {annotation['iscrowd']!r}")
        area = annotation.get("area", 0)
        if not (isinstance(area, (int, float)) and not isinstance(area, bool) and math.isfinite(area) and area >= 0):
            raise DataError(f"{where} (id {annotation['id']}): area must be a number >= 0, got {area!r}")
        by_image[annotation["image_id"]].append(annotation)

    entries = list(images.values())

    def iterate() -> Iterator[CocoImage]:
        for index, image in enumerate(entries):
            path = images_dir / image["file_name"]
            yield CocoImage(_key_for(index, image["file_name"]), path, image["id"], image["file_name"],
                            image.get("width"), image.get("height"), tuple(by_image[image["id"]]),
                            f"{path} (image id {image['id']} in {annotations_file})")

    return CocoSource(categories, SizedIterable(len(entries), iterate))


def _box_problem(bbox: list, width: int, height: int) -> str | None:
    x, y, w, h = bbox
    if w <= 0 or h <= 0:
        return "degenerate_box"
    if x < -BOX_TOLERANCE or y < -BOX_TOLERANCE or x + w > width + BOX_TOLERANCE or y + h > height + BOX_TOLERANCE:
        return "box_outside_image"
    return None


def _prepare_coco_image(entry: CocoImage, image_options: ImageOptions) -> Prepared:
    image_bytes, error = read_image_file(entry.path)
    image, ext = decode_checked(image_bytes, entry.path.suffix.lstrip("."), error)
    width, height = image.size
    if entry.width is not None and (entry.width, entry.height) != (width, height):
        raise SampleSkipped("size_mismatch", f"annotation file says {entry.width}x{entry.height}, "
                                             f"image is {width}x{height}")
    kept, dropped = [], []
    for annotation in entry.annotations:
        problem = _box_problem(annotation["bbox"], width, height)
        if problem is None:
            kept.append(annotation)
        else:
            message = f"annotation {annotation['id']}: bbox {annotation['bbox']} in a {width}x{height} image"
            dropped.append((problem, message))
    image_bytes, ext, (scale_x, scale_y) = encode_for_shard(image, image_bytes, ext, image_options)
    resized = (scale_x, scale_y) != (1.0, 1.0)
    boxes = [a["bbox"] for a in kept]
    areas = [a.get("area", a["bbox"][2] * a["bbox"][3]) for a in kept]
    if resized:
        boxes = [[x * scale_x, y * scale_y, w * scale_x, h * scale_y] for x, y, w, h in boxes]
        areas = [area * scale_x * scale_y for area in areas]
        width, height = round(width * scale_x), round(height * scale_y)
    target = {
        "image_id": entry.image_id, "file_name": entry.file_name, "width": width, "height": height,
        "boxes": boxes,
        "category_ids": [a["category_id"] for a in kept],
        "annotation_ids": [a["id"] for a in kept],
        "iscrowd": [a.get("iscrowd", 0) for a in kept],
        "area": areas,
    }
    sample = {"__key__": entry.key, ext: image_bytes, "json": json.dumps(target, separators=(",", ":")).encode()}
    return Prepared(entry.source, sample, dropped=dropped, info={"category_ids": target["category_ids"]},
                    pixels=pixel_moments(image))


class _BoxTally(Tally):
    def __init__(self, categories: list[dict]):
        self.categories, self.box_counts, self.images_without_boxes = categories, Counter(), 0

    def add(self, prepared: Prepared) -> None:
        self.box_counts.update(prepared.info["category_ids"])
        self.images_without_boxes += not prepared.info["category_ids"]

    def summary(self) -> dict:
        return {"categories": self.categories,
                "boxes": sum(self.box_counts.values()),
                "box_counts": {c["name"]: self.box_counts[c["id"]] for c in self.categories},
                "images_without_boxes": self.images_without_boxes}


def write_detection_shards(
    images: Iterable[CocoImage],
    out_dir,
    categories: list[dict],
    *,
    val_fraction: float = 0.0,
    seed: int = 0,
    options: ShardOptions = ShardOptions(),
    metadata: dict | None = None,
) -> list[WrittenShards]:
    """Check and write one sample per image: [out_dir], or [train, val] with a val split (see `write_shards`).
    Unreadable images are skipped, bad boxes dropped, both counted by reason (options.strict: the first one raises
    DataError naming the image and annotation)."""
    return write_shards(images, _prepare_coco_image, out_dir, new_tally=partial(_BoxTally, list(categories)),
                        val_fraction=val_fraction, seed=seed, options=options,
                        metadata={"kind": "detection", **(metadata or {})})


# ------------------------------------------------------------------------------------------------ reading back


def decode_detection(sample: dict) -> tuple[Image.Image, dict]:
    """A raw detection sample (as read by plain `webdataset.WebDataset`) -> (RGB PIL image, target dict)."""
    if "json" not in sample:
        raise DataError(f"sample {sample.get('__key__')!r} in {sample.get('__url__', '?')} has no json field")
    target = sample["json"]
    return decode_image(sample), json.loads(target) if isinstance(target, (bytes, str)) else target


def coco_ground_truth(shard_dir) -> dict:
    """Rebuild a COCO-format dict {"images", "annotations", "categories"} from a detection shard directory
    (its shards in order, its stats.json for the categories), e.g. for pycocotools' COCO evaluation."""
    shard_dir = Path(shard_dir)
    stats_file = shard_dir / STATS_FILE
    if not stats_file.is_file():
        raise DataError(f"{shard_dir}: no {STATS_FILE}; not a complete shard directory")
    stats = json.loads(stats_file.read_text())
    if "categories" not in stats:
        raise DataError(f"{stats_file}: no categories; not a detection shard directory")
    images, annotations = [], []
    shards = [str(shard_dir / name) for name in stats["shards"]]
    # every shard, also when only the main process of a distributed run calls this
    whole = dict(shardshuffle=False, nodesplitter=None, workersplitter=None)
    for sample in webdataset.WebDataset(shards, **whole) if shards else []:
        if "json" not in sample:
            raise DataError(f"sample {sample['__key__']!r} in {sample['__url__']} has no json field")
        target = json.loads(sample["json"])
        images.append({"id": target["image_id"], "file_name": target["file_name"], "width": target["width"],
                       "height": target["height"]})
        for box, category, annotation_id, crowd, area in zip(target["boxes"], target["category_ids"],
                                                             target["annotation_ids"], target["iscrowd"],
                                                             target["area"], strict=True):
            annotations.append({"id": annotation_id, "image_id": target["image_id"], "category_id": category,
                                "bbox": box, "area": area, "iscrowd": crowd})
    return {"images": images, "annotations": annotations, "categories": stats["categories"]}
