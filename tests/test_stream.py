"""Tests of ShardStream's kinds (labelled, image-text, detection), modes (evaluation, finite epochs, resampled),
resume, weighted source mixing, bad data and the skip guard, and the per-objective transforms; tiny data made here."""

import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2

from data import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    DataError,
    ShardOptions,
    ShardStream,
    ShardWriter,
    SkipGuard,
    clip_train_transform,
    count_samples,
    detection_eval_transform,
    detection_train_transform,
    expand_shards,
    expand_sources,
    mae_train_transform,
    read_coco,
    read_pair_folder,
    write_detection_shards,
    write_pair_shards,
)
from data.images import SampleSkipped
from data.transforms import RandomResizedCropNormalize, ToNormalizedTensor, ToRGB
from data.samples import open_image

from stream_helpers import as_uint8_tensor, collect, keys_of, total_skipped

# ------------------------------------------------------------------------------------------------ helpers


def encoded(array_or_color, size=(6, 6), fmt="PNG") -> bytes:
    if isinstance(array_or_color, np.ndarray):
        image = Image.fromarray(array_or_color)
    else:
        image = Image.new("RGB", size, array_or_color)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def write_labelled(directory: Path, num_shards: int, per_shard: int, prefix: str = "train", key_prefix: str = "",
                   image: bytes | None = None) -> Path:
    """num_shards shards of per_shard labelled 6x6 PNGs with keys f"{key_prefix}{i:04d}" and label i % 3."""
    rng = np.random.default_rng(len(key_prefix) + num_shards)
    with ShardWriter(directory, prefix=prefix, max_samples=per_shard) as writer:
        for i in range(num_shards * per_shard):
            pixels = image or encoded(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
            writer.write({"__key__": f"{key_prefix}{i:04d}", "png": pixels, "cls": str(i % 3).encode()})
    return directory


def box_image(width: int, height: int, box) -> Image.Image:
    """Black image with a white filled rectangle at box = (x, y, w, h) pixels."""
    image = Image.new("RGB", (width, height))
    x, y, w, h = box
    ImageDraw.Draw(image).rectangle([x, y, x + w - 1, y + h - 1], fill="white")
    return image


def white_extent(image: torch.Tensor):
    """(x0, y0, x1, y1) of the pixels brighter than half, in pixel-edge coordinates; None if there are none."""
    rows, cols = torch.nonzero(image.mean(0) > 0.5, as_tuple=True)
    if len(rows) == 0:
        return None
    return torch.tensor([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], dtype=torch.float32)


# ------------------------------------------------------------------------------------------------ kinds


def test_image_text_stream_tokenizes_captions_with_open_clip(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    tokenizer = open_clip.get_tokenizer("ViT-B-32")  # bundled BPE vocabulary: works offline
    folder = tmp_path / "pairs"
    folder.mkdir()
    captions = [f"a photo of {n} red squares" for n in range(7)]
    for i, caption in enumerate(captions):
        (folder / f"{i:04d}.png").write_bytes(encoded((200, 10 * i, 0), size=(20, 12)))
        (folder / f"{i:04d}.txt").write_text(caption)
    write_pair_shards(read_pair_folder(folder), tmp_path / "shards",
                      options=ShardOptions(shard_size=4, progress=False))
    with ShardWriter(tmp_path / "shards", prefix="extra") as writer:  # a pair that lost its caption
        writer.write({"__key__": "nocaption", "png": encoded("blue")})

    stream = ShardStream(tmp_path / "shards", clip_train_transform(16), batch_size=3, train=False,
                         kind="image-text", tokenizer=tokenizer)
    batches = collect(stream, num_workers=2)
    assert sorted(key.split("-")[-1] for key in keys_of(batches)) == [f"{i:04d}" for i in range(7)]
    assert total_skipped(batches) == {"missing_field": 1}
    for batch in batches:
        assert batch["image"].shape == (len(batch["key"]), 3, 16, 16)
        assert batch["text"].dtype == torch.long and batch["text"].shape == (len(batch["key"]), 77)
        assert torch.equal(batch["text"], tokenizer(batch["caption"]))
        assert batch["caption"] == [captions[int(key.split("-")[-1])] for key in batch["key"]]
    assert (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD) == (open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)


@pytest.fixture
def detection_shards(tmp_path) -> Path:
    """Three images with white boxes on black, written by the real COCO -> shards path."""
    images_dir = tmp_path / "images"
    images_dir.mkdir()
    specs = [(40, 30, [(4, 6, 10, 8), (20, 2, 12, 20)]), (24, 48, [(2, 10, 20, 30)]), (32, 32, [])]
    coco = {"images": [], "annotations": [], "categories": [{"id": 3, "name": "car"}, {"id": 7, "name": "boat"}]}
    for image_id, (width, height, boxes) in enumerate(specs, start=1):
        image = Image.new("RGB", (width, height))
        for x, y, w, h in boxes:
            ImageDraw.Draw(image).rectangle([x, y, x + w - 1, y + h - 1], fill="white")
        image.save(images_dir / f"{image_id}.png")
        coco["images"].append({"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height})
        for index, box in enumerate(boxes):
            coco["annotations"].append({"id": 10 * image_id + index, "image_id": image_id, "bbox": list(box),
                                        "category_id": 3 if index == 0 else 7, "iscrowd": 0})
    coco["annotations"].append({"id": 99, "image_id": 1, "bbox": [0, 0, 5, 5], "category_id": 3, "iscrowd": 1})
    (tmp_path / "coco.json").write_text(json.dumps(coco))
    source = read_coco(tmp_path / "coco.json", images_dir)
    write_detection_shards(source.images, tmp_path / "shards", source.categories,
                           options=ShardOptions(shard_size=2, progress=False))
    return tmp_path / "shards"


def test_detection_stream_gives_padded_images_masks_and_detr_targets(detection_shards):
    with ShardWriter(detection_shards, prefix="extra") as writer:  # an image without its target
        writer.write({"__key__": "notarget", "png": encoded("white")})
    transform = detection_eval_transform(size=24, max_size=48, mean=(0, 0, 0), std=(1, 1, 1))
    stream = ShardStream(detection_shards, transform, batch_size=3, train=False, kind="detection")
    [batch] = collect(stream, num_workers=0)
    assert batch["skipped"] == {"missing_field": 1}
    assert batch["key"] == ["0000000-1", "0000001-2", "0000002-3"]
    targets = {t["image_id"]: t for t in batch["target"]}
    # 40x30 -> shorter side 24: 32x24; 24x48 -> 24x48 (max 48); 32x32 -> 24x24. Padded to 48 high, 32 wide.
    assert batch["image"].shape == (3, 3, 48, 32) and batch["mask"].shape == (3, 48, 32)
    for index, target in enumerate(batch["target"]):
        height, width = target["size"].tolist()
        assert not batch["mask"][index, :height, :width].any() and batch["mask"][index].sum() == 48 * 32 - height * width
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.long
    assert targets[1]["orig_size"].tolist() == [30, 40] and targets[1]["size"].tolist() == [24, 32]
    assert targets[1]["labels"].tolist() == [3, 7]  # the crowd box is left out
    expected = torch.tensor([[4 + 5, 6 + 4, 10, 8], [20 + 6, 2 + 10, 12, 20]]) / torch.tensor([40, 30, 40, 30])
    assert torch.allclose(targets[1]["boxes"], expected, atol=1e-5)
    assert targets[3]["boxes"].shape == (0, 4) and targets[3]["labels"].shape == (0,)
    # Every box sits on white pixels of its (unpadded) image.
    for index, target in enumerate(batch["target"]):
        height, width = target["size"].tolist()
        for cx, cy, w, h in target["boxes"].tolist():
            assert batch["image"][index, :, int(cy * height), int(cx * width)].min() > 0.9


def test_detection_train_transform_moves_boxes_with_the_image():
    transform = detection_train_transform(scales=(40, 56, 72), max_size=100, crop_scales=(48, 64),
                                          crop_size=(20, 40), mean=(0, 0, 0), std=(1, 1, 1))
    seen_flip = seen_crop = False
    for seed in range(24):
        torch.manual_seed(seed)
        box = (30 + seed, 12, 25, 18)
        target = {"boxes": tv_tensors.BoundingBoxes(torch.tensor([box], dtype=torch.float32), format="XYWH",
                                                    canvas_size=(60, 90)),
                  "labels": torch.tensor([5])}
        image, out = transform(box_image(90, 60, box), target)
        assert image.dtype == torch.float32 and max(image.shape[-2:]) <= 100  # the max_size cap
        extent = white_extent(image)
        if len(out["boxes"]) == 0:  # a crop that missed the box drops it and its label
            assert out["labels"].numel() == 0 and (extent is None or (extent[2:] - extent[:2]).min() <= 1)
            seen_crop = True
            continue
        boxes = torch.as_tensor(out["boxes"])
        x0, y0, w, h = boxes[0].tolist()
        assert out["labels"].tolist() == [5]
        assert torch.allclose(torch.tensor([x0, y0, x0 + w, y0 + h]), extent, atol=1.5), (seed, boxes, extent)
        seen_flip |= x0 + w / 2 < image.shape[-1] / 2  # the box started in the right half
        seen_crop |= max(image.shape[-2:]) <= 40
    assert seen_flip and seen_crop


def test_open_image_gives_the_same_rgb_pixels_as_pil_for_every_format():
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    cases = {fmt: colour for fmt in ("JPEG", "PNG", "BMP", "TIFF", "WEBP")}
    cases["grey PNG"] = colour[..., 0]
    for name, pixels in cases.items():
        data = encoded(pixels, fmt=name.split()[-1])
        with Image.open(io.BytesIO(data)) as image:
            expected = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)
        tensor, stored_size = open_image(data)
        assert tensor.dtype == torch.uint8 and stored_size == (30, 20), name
        assert torch.equal(tensor, expected), name
    sixteen_bit = io.BytesIO()
    Image.fromarray(np.full((8, 8), 40000, dtype=np.uint16)).save(sixteen_bit, format="PNG")
    tensor, _ = open_image(sixteen_bit.getvalue())
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 8, 8)
    jpeg = encoded(colour, fmt="JPEG")
    for bad in (jpeg[: len(jpeg) // 2], b"\xff\xd8 not a jpeg", b""):
        with pytest.raises(SampleSkipped) as caught:
            open_image(bad)
        assert caught.value.reason == "undecodable_image"


def test_mae_transform_gives_nearly_the_same_pixels_from_a_tensor_as_from_pil():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(60, 80, 3), dtype=np.uint8))
    transform = mae_train_transform(32, mean=(0, 0, 0), std=(1, 1, 1))
    torch.manual_seed(5)
    from_pil = transform(image)
    torch.manual_seed(5)
    from_tensor = transform(torch.from_numpy(np.array(image)).permute(2, 0, 1))
    assert from_tensor.shape == from_pil.shape == (3, 32, 32) and from_tensor.is_contiguous()
    assert (from_tensor - from_pil).abs().max() <= 1 / 255 + 1e-6  # same crop; resize within one grey level


@pytest.mark.parametrize("flip", [True, False])
def test_crop_transform_equals_the_v2_compose_it_replaces(flip):
    rng = np.random.default_rng(2)
    rgb = torch.from_numpy(rng.integers(0, 256, size=(3, 28, 36), dtype=np.uint8))
    grey = torch.from_numpy(rng.integers(0, 256, size=(1, 28, 28), dtype=np.uint8))
    pil = Image.fromarray(rng.integers(0, 256, size=(40, 30), dtype=np.uint8))  # mode L
    mean, std = (0.2, 0.3, 0.4), (0.5, 0.6, 0.7)
    reference = v2.Compose([
        ToRGB(),
        v2.RandomResizedCrop(16, scale=(0.2, 1.0), interpolation=InterpolationMode.BICUBIC, antialias=True),
        *([v2.RandomHorizontalFlip()] if flip else []),
        ToNormalizedTensor(mean, std),
    ])
    ours = RandomResizedCropNormalize(16, (0.2, 1.0), mean, std, flip=flip)
    for image in (rgb, grey, pil):
        for seed in range(40):
            torch.manual_seed(seed)
            expected, next_draw_expected = reference(image), torch.rand(1)
            torch.manual_seed(seed)
            got, next_draw = ours(image), torch.rand(1)
            assert torch.equal(got, expected), (type(image), seed)  # the same pixels
            assert torch.equal(next_draw, next_draw_expected)  # from the same draws


def test_decode_size_uses_jpeg_draft_mode_and_keeps_detection_boxes_right(tmp_path):
    jpeg = encoded(np.full((256, 192, 3), 128, dtype=np.uint8), fmt="JPEG")
    assert open_image(jpeg)[0].shape == (3, 256, 192)
    image, stored_size = open_image(jpeg, decode_size=40)
    assert stored_size == (192, 256) and image.shape == (3, 64, 48)  # 1/4 scale: the largest that stays >= 40
    assert open_image(jpeg, decode_size=100)[0].shape == (3, 256, 192)  # 1/2 would be < 100 a side: no draft
    assert open_image(encoded("red", size=(100, 100)), decode_size=10)[0].shape == (3, 100, 100)  # PNG: no draft

    with ShardWriter(tmp_path) as writer:
        target = {"image_id": 1, "boxes": [[64, 32, 96, 128]], "category_ids": [2], "iscrowd": [0]}
        writer.write({"__key__": "a", "jpg": encode_box_jpeg(), "json": json.dumps(target).encode()})
    results = []
    for decode_size in (None, 50):
        stream = ShardStream(tmp_path, detection_eval_transform(size=50, max_size=100), 1, train=False,
                             kind="detection", decode_size=decode_size)
        [batch] = collect(stream, num_workers=0)
        results.append(batch["target"][0])
    assert results[1]["orig_size"].tolist() == [256, 256] and results[1]["size"].tolist() == [50, 50]
    assert torch.allclose(results[0]["boxes"], results[1]["boxes"], atol=1e-4)
    assert torch.allclose(results[0]["boxes"], torch.tensor([[112 / 256, 96 / 256, 96 / 256, 128 / 256]]))


def encode_box_jpeg() -> bytes:
    buffer = io.BytesIO()
    box_image(256, 256, (64, 32, 96, 128)).save(buffer, format="JPEG")
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------ modes


def test_finite_epochs_two_processes_two_workers_read_every_sample_once_per_pass(tmp_path):
    shards = write_labelled(tmp_path, num_shards=8, per_shard=4)  # 2 shards = 2 batches per slot and pass
    passes = [[], []]
    for rank in range(2):
        stream = ShardStream(shards, as_uint8_tensor(), batch_size=4, train=True, rank=rank, world_size=2,
                             shuffle_buffer=3)
        batches = collect(stream, num_workers=2, max_batches=8)
        passes[0] += keys_of(batches[:4])
        passes[1] += keys_of(batches[4:])
    expected = [f"{i:04d}" for i in range(32)]
    assert sorted(passes[0]) == expected and sorted(passes[1]) == expected
    assert passes[0] != passes[1]  # each pass shuffles anew


def test_finite_training_with_fewer_shards_than_slots_names_the_counts(tmp_path):
    shards = write_labelled(tmp_path, num_shards=3, per_shard=4)
    stream = ShardStream(shards, as_uint8_tensor(), batch_size=2, train=True, rank=1, world_size=2)
    with pytest.raises(DataError, match=r"3 shard\(s\) .* for 4 reading slots \(2 process\(es\) x 2 DataLoader "
                                        r"worker\(s\)\).*resampled=True"):
        collect(stream, num_workers=2, max_batches=1)
    # Evaluation still splits samples and reads each once.
    keys = []
    for rank in range(2):
        keys += keys_of(collect(ShardStream(shards, as_uint8_tensor(), 5, train=False, rank=rank, world_size=2), 2))
    assert sorted(keys) == [f"{i:04d}" for i in range(12)]


def test_resampled_one_shard_feeds_four_slots_endlessly(tmp_path):
    shards = write_labelled(tmp_path, num_shards=1, per_shard=5)
    orders = []
    for rank in range(2):
        stream = ShardStream(shards, as_uint8_tensor(), batch_size=3, train=True, resampled=True, rank=rank,
                             world_size=2, shuffle_buffer=4)
        batches = collect(stream, num_workers=2, max_batches=10)  # 15 samples per slot: 3 draws of the shard
        assert len(batches) == 10 and all(b["image"].shape == (3, 3, 6, 6) for b in batches)
        assert set(keys_of(batches)) == {f"{i:04d}" for i in range(5)}
        orders += [keys_of(batches[0::2]), keys_of(batches[1::2])]
    assert len({tuple(order) for order in orders}) == 4  # every slot has its own order


@pytest.mark.parametrize("resampled", [False, True])
def test_resume_continues_the_stream_exactly(tmp_path, resampled):
    shards = write_labelled(tmp_path, num_shards=4, per_shard=10)  # 2 shards per worker: 5 batches per pass

    def run(start_batch, num_batches):
        stream = ShardStream(shards, mae_train_transform(8), batch_size=4, train=True, seed=3, shuffle_buffer=8,
                             start_batch=start_batch, resampled=resampled)
        return collect(stream, num_workers=2, max_batches=num_batches)

    full = run(0, 14)  # 7 batches per worker: into the second pass
    resumed = run(5, 9)
    for expected, got in zip(full[5:], resumed, strict=True):
        assert got["key"] == expected["key"]
        assert torch.equal(got["label"], expected["label"])
        assert torch.equal(got["image"], expected["image"])


# ------------------------------------------------------------------------------------------------ shard specs


def test_sources_with_brace_patterns_directories_and_weights(tmp_path):
    write_labelled(tmp_path / "a", num_shards=2, per_shard=1, key_prefix="a")  # one sample a shard: one a draw
    write_labelled(tmp_path / "b", num_shards=1, per_shard=1, key_prefix="b")
    spec = f"{tmp_path}/a/train-{{000000..000001}}.tar::{tmp_path}/b"
    assert expand_shards(spec) == [f"{tmp_path}/a/train-00000{i}.tar" for i in range(2)] + [f"{tmp_path}/b/train-000000.tar"]
    with pytest.warns(UserWarning, match="counted samples by reading"):  # ShardWriter alone writes no stats.json
        assert count_samples(spec) == 3
    assert [(len(shards), weight) for shards, weight in expand_sources(spec, "1::3")] == [(2, 1.0), (1, 3.0)]
    with pytest.raises(DataError, match=r"1 weight\(s\) \[2.0\] for 2 source\(s\)"):
        expand_sources(spec, [2])
    with pytest.raises(ValueError, match="resampled=True"):
        ShardStream(spec, as_uint8_tensor(), 4, train=True, weights=[1, 3])

    def share_of_b(**options) -> float:
        stream = ShardStream(spec, as_uint8_tensor(), batch_size=100, train=True, resampled=True,
                             shuffle_buffer=0, **options)
        keys = keys_of(collect(stream, num_workers=0, max_batches=8))
        return sum(key.startswith("b") for key in keys) / len(keys)

    # Source b: weight 3 x 1 shard against source a: weight 1 x 2 shards -> 3/5 of the draws, as in open_clip's
    # ResampledShards2 (800 draws: standard deviation 0.017).
    assert abs(share_of_b(weights=[1.0, 3.0]) - 3 / 5) < 0.05
    assert abs(share_of_b() - 1 / 3) < 0.05  # unweighted: every shard alike


# ------------------------------------------------------------------------------------------------ bad data


def test_truncated_shard_and_garbage_jpeg_are_skipped_and_counted(tmp_path):
    jpeg = encoded(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8), fmt="JPEG")
    with ShardWriter(tmp_path, max_samples=4) as writer:
        for i in range(8):
            image = jpeg[: len(jpeg) // 2] if i == 5 else jpeg  # a JPEG cut in half
            writer.write({"__key__": f"{i:03d}", "jpg": image, "cls": b"1"})
    first = tmp_path / "train-000000.tar"
    with tarfile.open(first) as tar:
        third = next(m for m in tar.getmembers() if m.name == "002.jpg")
    first.write_bytes(first.read_bytes()[: third.offset_data + third.size // 2])

    batches = collect(ShardStream(tmp_path, as_uint8_tensor(), 2, train=False), num_workers=0)
    assert keys_of(batches) == ["000", "001", "004", "006", "007"]
    assert total_skipped(batches) == {"bad_tar": 1, "undecodable_image": 1}
    resampled = ShardStream(tmp_path, as_uint8_tensor(), 4, train=True, resampled=True, shuffle_buffer=0)
    counts = total_skipped(collect(resampled, num_workers=0, max_batches=10))
    assert set(counts) == {"bad_tar", "undecodable_image"}


@pytest.mark.parametrize("resampled", [False, True])
def test_all_garbage_data_raises_a_clear_error_instead_of_waiting_forever(tmp_path, resampled):
    write_labelled(tmp_path, num_shards=2, per_shard=15, image=b"\xff\xd8 not really a jpeg")
    stream = ShardStream(tmp_path, as_uint8_tensor(), 4, train=True, resampled=resampled,
                         skip_guard_min_samples=20)
    # In the main process: a loader whose worker failed shuts down only when garbage-collected, slowly.
    with pytest.raises(DataError, match=r"reading slot 0 of 1 .*: 20 of 20 samples skipped \(undecodable_image: 20\), "
                                        r"more than the allowed 50%; check the shards"):
        collect(stream, num_workers=0, max_batches=1)


def test_resampled_empty_shards_raise_instead_of_spinning(tmp_path):
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    stream = ShardStream(tmp_path / "empty.tar", as_uint8_tensor(), 2, train=True, resampled=True)
    with pytest.raises(DataError, match=r"100 shard draws in a row gave no samples .*empty.tar"):
        next(iter(stream))


def test_skip_guard_counts_reasons_and_waits_for_enough_samples():
    guard = SkipGuard(max_rate=0.5, min_samples=100, where="train shards x/{0..9}.tar")
    guard.update(2, {"undecodable_image": 60, "bad_tar": 7})  # 69 seen: too few to judge
    assert guard.seen == 69 and guard.rate == pytest.approx(67 / 69)
    with pytest.raises(DataError) as error:
        guard.update(1, {"undecodable_image": 30})
    assert str(error.value).startswith("train shards x/{0..9}.tar: 97 of 100 samples skipped (undecodable_image: "
                                       "90, bad_tar: 7), more than the allowed 50%; check the shards")
    healthy = SkipGuard(max_rate=0.1, min_samples=10)
    for _ in range(100):
        healthy.update(19, {"missing_field": 1})
    assert healthy.rate == pytest.approx(0.05)
    never = SkipGuard(max_rate=1.0, min_samples=1)
    never.update(0, {"bad_tar": 5})
    with pytest.raises(ValueError, match="max_rate"):
        SkipGuard(max_rate=1.5)


def test_clip_train_transform_crops_gently_and_normalises_like_openai():
    image = Image.fromarray(np.tile(np.arange(64, dtype=np.uint8) * 4, (64, 1))).convert("RGB")
    torch.manual_seed(0)
    out = clip_train_transform(32)(image)
    assert out.shape == (3, 32, 32)
    # A 90-100% crop keeps (nearly) the full ramp: the darkest column stays near black, the brightest near white.
    black, white = (torch.tensor([0.0, 1.0])[:, None] - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    assert (out[:, :, 0].mean(1) - black).abs().max() < 0.6 and (out[:, :, -1].mean(1) - white).abs().max() < 0.6
    assert re.search("scale=\\(0.9, 1.0\\)", repr(clip_train_transform(32)))
