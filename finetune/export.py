"""Take trained weights where users take them: Hugging Face transformers, ONNX, and back.

    python -m finetune.export hf RUN --out DIR              MAE ViT -> transformers.ViTMAEForPreTraining folder
    python -m finetune.export hf RUN --out DIR --encoder-only          its encoder -> transformers.ViTModel folder
    python -m finetune.export onnx RUN --out DIR            any encoder of ours (ViT, Swin, CrossFormer, DAT, MSwin,
                                                            AA-ResNet, a finetuned classifier; a CLIP run's image and
                                                            text towers) -> .onnx with a dynamic batch size
    python -m finetune.export from-hf HF_DIR --out DIR      a ViTMAE folder (facebook/vit-mae-* layout) -> our MAE
                                                            checkpoint: model.checkpoint= to continue pretraining,
                                                            encoder.checkpoint= for every head

RUN is a run directory, a checkpoint directory or a weights file (a CLIP run's open_clip/ export folder too).
Every export folder gets a README.md model card (architecture, objective and config, data, steps, the metrics the
run recorded plus those of `--eval DIR` evaluation runs, and the lines that load it). Nothing is downloaded;
uploading a folder to the Hub is one `huggingface_hub.upload_folder` call (in the card). Bad input ends with one
`error:` line and exit status 2.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from pretrain.checkpoint import CheckpointError, normalisation_metadata, read_weights, read_weights_metadata
from pretrain.checkpoint import recorded_normalisation, resolve_weights_file, save_weights
from pretrain.config import EncoderConfig
from pretrain.encoders import CLASSIFIER_OBJECTIVE, CLIP_OBJECTIVE, MAE_OBJECTIVE, build_encoder
from pretrain.encoders import checkpoint_kind, pretraining_model_from_checkpoint, recorded_image_size
from pretrain.models import MaskedAutoencoderViT, load_official_mae_checkpoint

from .hf_vit_mae import from_hf_state_dict, hf_config, hf_vit_config, mae_config_from_hf, to_hf_state_dict
from .model_card import RunRecord, read_run_record, write_model_card

HF_WEIGHTS_FILES = ("model.safetensors", "pytorch_model.bin")
IMPORTED_MODEL_NAME = "hf_vit_mae"  # the model_name our checkpoint of an imported ViTMAE records


class ExportError(ValueError):
    """Bad input for an export: one line, naming the file or argument."""


# ------------------------------------------------------------------------------------------------ ours -> HF

def export_hf(checkpoint: str | Path, out: Path, encoder_only: bool = False, evals: Sequence[str] = (),
              command: str = "") -> Path:
    """Our MAE ViT checkpoint -> a folder `ViTMAEForPreTraining.from_pretrained` (or, `encoder_only`,
    `ViTModel.from_pretrained(out, add_pooling_layer=False)`) loads; returns `out`."""
    weights_file = resolve_weights_file(checkpoint)
    metadata = read_weights_metadata(weights_file)
    if metadata.get("objective") != MAE_OBJECTIVE:
        raise ExportError(f"{weights_file} is not an MAE checkpoint of this project (objective "
                          f"{metadata.get('objective')!r}); Hugging Face ViTMAE takes MAE ViT runs, ONNX takes any")
    model, _ = pretraining_model_from_checkpoint(weights_file)
    if not isinstance(model, MaskedAutoencoderViT):
        raise ExportError(f"{weights_file} holds a {type(model).__name__}; Hugging Face's ViTMAE is a plain ViT, so "
                          f"only MAE ViT runs export to it (`onnx` exports any encoder)")
    cfg = model.config
    try:
        config = hf_vit_config(cfg) if encoder_only else hf_config(cfg)
    except ValueError as err:
        raise ExportError(f"{weights_file}: {err}") from None
    state = to_hf_state_dict(model.state_dict(), cfg["depth"], cfg["decoder_depth"], encoder_only=encoder_only)
    record = read_run_record(weights_file, metadata, evals)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_weights(tmp / "model.safetensors", state, {"format": "pt"})  # transformers checks the format key
        files = {"config.json": f"`transformers` config ({config['model_type']})",
                 "model.safetensors": "the weights, in the layout of the facebook/vit-mae-* Hub repositories"}
        if record.normalisation is not None:
            (tmp / "preprocessor_config.json").write_text(json.dumps(_image_processor(cfg, record), indent=2) + "\n")
            files["preprocessor_config.json"] = "`ViTImageProcessor`: the size and normalisation the run trained with"
        cls = "ViTModel" if encoder_only else "ViTMAEForPreTraining"
        extra = ", add_pooling_layer=False" if encoder_only else ""
        output = ("outputs.last_hidden_state  # [N, 1 + patches, hidden]: the class token, then every patch"
                  if encoder_only else "outputs.loss, outputs.logits, outputs.mask  # pass noise= to fix the mask")
        snippet = f"""```python
from transformers import AutoImageProcessor, {cls}

model = {cls}.from_pretrained("{out}"{extra}).eval()
processor = AutoImageProcessor.from_pretrained("{out}")
outputs = model(**processor(images, return_tensors="pt"))
{output}
```"""
        write_model_card(tmp / "README.md", record, folder=out, title=f"{record.model_name} ({cls})",
                         library="transformers",
                         command=command, load_snippet=snippet, files=files,
                         parameters=sum(v.numel() for v in state.values()))

    return _write_folder(out, write)


def _image_processor(cfg: dict[str, Any], record: RunRecord) -> dict[str, Any]:
    mean, std = record.normalisation
    channels = cfg["in_chans"]
    return {"image_processor_type": "ViTImageProcessor", "do_resize": True,
            "size": {"height": cfg["img_size"], "width": cfg["img_size"]}, "resample": 3,  # bicubic
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": list(mean)[:channels], "image_std": list(std)[:channels]}


# ------------------------------------------------------------------------------------------------ HF -> ours

def import_hf(folder: str | Path, out: Path, command: str = "") -> Path:
    """A ViTMAE folder (config.json + model.safetensors or pytorch_model.bin, the facebook/vit-mae-* layout) ->
    `out/model.safetensors`, a masked-image checkpoint of ours; returns `out`."""
    folder = Path(folder)
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ExportError(f"{config_file} does not exist (a Hugging Face model folder holds config.json)")
    weights = next((folder / name for name in HF_WEIGHTS_FILES if (folder / name).is_file()), None)
    if weights is None:
        raise ExportError(f"{folder} holds none of {', '.join(HF_WEIGHTS_FILES)}")
    try:
        arguments = mae_config_from_hf(json.loads(config_file.read_text()), str(config_file))
    except (ValueError, KeyError) as err:
        raise ExportError(str(err)) from None
    model = MaskedAutoencoderViT(**arguments)
    hf_state, _ = read_weights(weights)
    try:
        state = from_hf_state_dict(hf_state, arguments["depth"], arguments["decoder_depth"])
        loaded = load_official_mae_checkpoint(model, state)  # same names as the official release from here on
    except KeyError as err:
        raise ExportError(f"{weights} lacks {err} for a ViTMAE of {arguments['depth']} blocks") from None
    except ValueError as err:
        raise ExportError(f"{weights}: {err}") from None
    metadata = {"objective": MAE_OBJECTIVE, "model_name": IMPORTED_MODEL_NAME, "model_config": json.dumps(model.config)}
    processor_file = folder / "preprocessor_config.json"
    if processor_file.is_file():
        processor = json.loads(processor_file.read_text())
        if "image_mean" in processor and "image_std" in processor:
            metadata.update(normalisation_metadata(processor["image_mean"], processor["image_std"]))

    def write(tmp: Path) -> None:
        save_weights(tmp / "model.safetensors", model.state_dict(), metadata)
        record = RunRecord(weights_file=weights, run_dir=None, objective=MAE_OBJECTIVE, model_name=IMPORTED_MODEL_NAME,
                           model_config=model.config, normalisation=recorded_normalisation(tmp / "model.safetensors"))
        decoder = "" if loaded["decoder_loaded"] else " (the file has no decoder: it is freshly initialised)"
        snippet = f"""```bash
# continue pretraining (set data.image_size to {arguments['img_size']})
python -m pretrain model.checkpoint={out} data.image_size={arguments['img_size']} data.train=YOUR_SHARDS
# any head: linear probe, k-NN, finetuning, distillation, DETR
python -m finetune --config configs/linprobe_mae_tiny_demo.yaml encoder.checkpoint={out}
```

```python
from pretrain.encoders import pretraining_model_from_checkpoint
model, _ = pretraining_model_from_checkpoint("{out}")  # our MaskedAutoencoderViT{decoder}
```"""
        write_model_card(tmp / "README.md", record, folder=out, library="vitpretrain",
                         title=f"{folder.name} (imported from Hugging Face ViTMAE)",
                         command=command, load_snippet=snippet,
                         files={"model.safetensors": "our MAE checkpoint (metadata: model config, normalisation)"},
                         parameters=sum(v.numel() for v in model.state_dict().values()))

    return _write_folder(out, write)


# ------------------------------------------------------------------------------------------------ ONNX

def export_onnx_folder(checkpoint: str | Path, out: Path, timm_model: str | None = None,
                       image_size: int | None = None, evals: Sequence[str] = (), command: str = "") -> Path:
    """Any encoder of ours (or `timm_model` with local weights) -> out/*.onnx with a dynamic batch size, each checked
    against torch with onnxruntime (1e-4); a CLIP run gives image_encoder.onnx and text_encoder.onnx."""
    from .onnx_export import CLIPImageTower, CLIPTextTower, ImageEncoder, check_onnx, export_onnx

    kind = None if timm_model else checkpoint_kind(checkpoint)
    weights_file = _weights_file(checkpoint)
    metadata = read_weights_metadata(weights_file)
    exports: list[tuple[str, torch.nn.Module, torch.Tensor, str, str]] = []  # file, module, example, in, out
    if kind == CLIP_OBJECTIVE:
        from pretrain.models.clip import load_clip, tokenizer_for

        clip, name = load_clip(checkpoint)
        size = image_size or _image_size_of(clip.visual)
        tokens = tokenizer_for(name)(["a photo of a thing", "a picture"])
        exports += [("image_encoder.onnx", CLIPImageTower(clip), _example_images(clip.visual, size), "images",
                     "image_features"),
                    ("text_encoder.onnx", CLIPTextTower(clip), tokens, "tokens", "text_features")]
        description = f"open_clip {name}"
    else:
        other_weights = {"source": "timm", "model_name": timm_model} if timm_model else {}
        if timm_model and image_size is None:  # the size its timm config names (our checkpoints record theirs)
            from timm.models import get_pretrained_cfg_value

            image_size = (get_pretrained_cfg_value(timm_model, "input_size") or [None])[-1]
        cfg = EncoderConfig(checkpoint=str(checkpoint), global_pool=None, drop_path=0.0, **other_weights)
        keep_head = kind == CLASSIFIER_OBJECTIVE  # a classifier exports whole: images -> logits
        encoder = build_encoder(cfg, image_size, keep_head=keep_head)
        size = image_size or recorded_image_size(encoder.spec) or _image_size_of(encoder.model)
        output = "logits" if keep_head else "features"
        exports.append(("encoder.onnx", ImageEncoder(encoder.model.eval()), _example_images(encoder.model, size),
                        "images", output))
        description = encoder.description
    record = read_run_record(weights_file, metadata, evals)

    def write(tmp: Path) -> None:
        files, checks = {}, []
        for file_name, module, example, input_name, output_name in exports:
            export_onnx(module, example, tmp / file_name, input_name=input_name, output_name=output_name)
            batch = torch.cat([example, example[:1]])  # another batch size than the traced one
            checks.append(f"{file_name}: max |onnxruntime - torch| = {check_onnx(tmp / file_name, module, batch):.2e}")
            files[file_name] = f"`{input_name}` [batch, {', '.join(map(str, example.shape[1:]))}] -> `{output_name}`"
        first = exports[0]
        shape, dtype = ", ".join(map(str, (2, *first[2].shape[1:]))), str(first[2].dtype).split(".")[-1]
        snippet = f"""```python
import numpy as np, onnxruntime

session = onnxruntime.InferenceSession("{out / first[0]}", providers=["CPUExecutionProvider"])
{first[3]} = np.zeros(({shape}), np.{dtype})  # normalised with the mean and std under Pretraining
({first[4]},) = session.run(None, {{"{first[3]}": {first[3]}}})
```

Checked at export, on a batch of another size than the traced one: {'; '.join(checks)}."""
        write_model_card(tmp / "README.md", record, folder=out, title=f"{description} (ONNX)", library="onnx",
                         command=command,
                         load_snippet=snippet, files=files,
                         parameters=sum(p.numel() for _, module, *_ in exports for p in module.parameters()))

    return _write_folder(out, write)


def _weights_file(checkpoint: str | Path) -> Path:
    from pretrain.models.clip import EXPORT_CONFIG_FILE, EXPORT_WEIGHTS_FILE

    path = Path(checkpoint)
    if path.is_dir() and (path / EXPORT_CONFIG_FILE).is_file():  # an open_clip export folder
        return path / EXPORT_WEIGHTS_FILE
    return resolve_weights_file(path)


def _image_size_of(model: torch.nn.Module) -> int:
    size = getattr(model, "image_size", None) or getattr(model, "pretrained_cfg", {}).get("input_size", [None])[-1]
    if size is None:
        raise ExportError(f"the input size of {type(model).__name__} is not recorded: give --image-size")
    return size[-1] if isinstance(size, (tuple, list)) else int(size)


def _example_images(model: torch.nn.Module, size: int) -> torch.Tensor:
    channels = getattr(getattr(model, "patch_embed", None), "proj", None)
    in_chans = channels.in_channels if isinstance(channels, torch.nn.Conv2d) else 3
    return torch.randn(2, in_chans, size, size, generator=torch.Generator().manual_seed(0))


# ------------------------------------------------------------------------------------------------ folders, CLI

def _write_folder(out: Path, write: Callable[[Path], None]) -> Path:
    """Fill a temporary folder beside `out`, then rename it into place: an export that fails leaves no half folder."""
    out = Path(out)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m finetune.export", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, type=Path, help="the folder to write (new, or --overwrite)")
    common.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    evals = argparse.ArgumentParser(add_help=False)
    evals.add_argument("--eval", action="append", default=[], metavar="RUN",
                       help="an evaluation run (linear probe, k-NN, zero-shot...) whose metrics.json the card lists")
    hf = commands.add_parser("hf", parents=[common, evals], help="MAE ViT -> transformers ViTMAEForPreTraining")
    hf.add_argument("checkpoint", help="our MAE ViT run, checkpoint directory or weights file")
    hf.add_argument("--encoder-only", action="store_true", help="the encoder alone, as a transformers ViTModel")
    onnx = commands.add_parser("onnx", parents=[common, evals], help="any encoder or CLIP tower -> ONNX")
    onnx.add_argument("checkpoint", help="our run, checkpoint, weights file or open_clip export folder")
    onnx.add_argument("--timm-model", help="for weights not written by this project: their timm model name")
    onnx.add_argument("--image-size", type=int, help="the input size (default: the one the model was built for)")
    from_hf = commands.add_parser("from-hf", parents=[common],
                                  help="a Hugging Face ViTMAE folder -> our MAE checkpoint")
    from_hf.add_argument("folder", help="a folder with config.json and model.safetensors / pytorch_model.bin")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parser().parse_args(argv)
    command = " ".join(["python -m finetune.export", *map(shlex.quote, argv)])
    if args.out.exists() and any(args.out.iterdir()) and not args.overwrite:
        print(f"error: --out {args.out} is not empty; add --overwrite to replace it", file=sys.stderr)
        return 2
    try:
        if args.command == "hf":
            out = export_hf(args.checkpoint, args.out, args.encoder_only, args.eval, command)
        elif args.command == "onnx":
            out = export_onnx_folder(args.checkpoint, args.out, args.timm_model, args.image_size, args.eval,
                                     command)
        else:
            out = import_hf(args.folder, args.out, command)
    except (ValueError, CheckpointError, RuntimeError) as err:  # ExportError, ConfigError, a failed ONNX check
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}: {', '.join(sorted(p.name for p in out.iterdir()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
