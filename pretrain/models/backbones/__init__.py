"""The survey's hierarchical backbones as timm models: CrossFormer, DAT, MSwin and the attention-augmented ResNet.

Importing this package (``import pretrain.models`` does) registers them with timm, so every head, objective and
checkpoint road of this project builds them by name, exactly as it builds timm's ViT and Swin:

    crossformer.py  CrossFormer v1 (Wang et al., ICLR 2022): cross-scale embedding, long/short distance attention,
                    dynamic position bias            crossformer_{cpu,tiny,small,base,large}
    dat.py          DAT v1 (Xia et al., CVPR 2022): deformable attention   dat_{cpu,tiny,small,base}
    mswin.py        MSwin (Xu et al., ECCV 2022, V2X-ViT) as an image backbone: parallel multi-scale windows
                                                     mswin_{cpu,tiny}
    aa_resnet.py    attention-augmented convolution (Bello et al., ICCV 2019) in a ResNet
                                                     aa_resnet{26,50}, aa_resnet_cpu

The *_cpu sizes take 32x32 inputs and train in a fraction of a second a step on a CPU (tests, Fashion-MNIST).

Every backbone keeps the same contract (timm's hooks plus two for masked-image pretraining):

    forward_embed(images [N, C, H, W]) -> tokens [N, H/s, W/s, D]   the patch embedding (CEL, conv stem ...),
                                                                     s = patch_stride, D = embed_dim
    forward_stages(tokens [N, h, w, D]) -> the last stage's map, final norm applied, in `output_fmt`
                                                                     ("NHWC"; "NCHW" for the ResNet)
    forward_features(images) = forward_stages(forward_embed(images))
    forward_head(features, pre_logits=False)  global average pool (+ head); pre_logits: [N, num_features]
    no_weight_decay(), group_matcher(coarse), set_grad_checkpointing(enable), get_classifier(),
    reset_classifier(num_classes, global_pool), feature_info [{num_chs, reduction, module}, ...],
    size_multiple: input sides must be multiples of it; other sizes are a ValueError naming the size

SimMIM (pretrain/models/simmim.py) pretrains any of them through `forward_embed` / `forward_stages`.

Module, parameter and buffer names follow the official code, so a released checkpoint loads as it is:
`load_official_checkpoint(model, path)` below, or `encoder.source: timm` with `encoder.checkpoint` for any head.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from ...checkpoint import load_state_dict_checked, read_weights
from . import aa_resnet, crossformer, dat, mswin  # noqa: F401  (registers the models with timm)


def load_official_checkpoint(model: nn.Module, path_or_state: str | Path | Mapping[str, torch.Tensor]) -> None:
    """Load a released checkpoint (the official repositories' ``.pth``: ``{"model": state_dict}``, official key
    names, persistent buffers such as ``relative_position_index``, CrossFormer's ``biases``, DAT's ``attn_mask``)
    into ``model``, one of this package's backbones, through the one weights reader (``torch.load(weights_only=
    True)``, wrappers taken off). The family's ``checkpoint_filter_fn`` fits what differs (e.g. a new head); every
    other key must match in name and shape, or a CheckpointError names them."""
    if isinstance(path_or_state, (str, Path)):
        state, _ = read_weights(path_or_state)
        source = str(path_or_state)
    else:
        state, source = dict(path_or_state), "<state dict>"
    filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    load_state_dict_checked(model, state, source)
