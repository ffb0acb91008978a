"""Attention augmented convolution and AA-ResNet (pretrain/models/backbones/aa_resnet.py): the relative logits
against a direct computation, translation equivariance of the position term, the channel split, stride and input
sizes, the parameter count of the paper's AA-ResNet-50, and the timm hooks of the package's contract."""
from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.optim import param_groups_layer_decay

import pretrain.models.backbones.aa_resnet as aa
from pretrain.models.backbones.aa_resnet import AAResNet, AugmentedConv2d

pytestmark = pytest.mark.usefixtures("single_thread")


def cpu_model(**kwargs) -> AAResNet:
    torch.manual_seed(0)
    return timm.create_model("aa_resnet_cpu", num_classes=10, **kwargs)


def randomise_norms(model: torch.nn.Module) -> None:
    """Non-zero last BNs (zero-initialised) and running statistics, so every branch reaches the output."""
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            for tensor in (module.weight, module.bias, module.running_mean):
                tensor.data.normal_(0, 0.5)
            module.running_var.data.uniform_(0.5, 1.5)


def direct_relative_logits(q: torch.Tensor, rel_h: torch.Tensor, rel_w: torch.Tensor, height: int, width: int):
    """The paper's definition, one query (i, j) and key (a, b) at a time. q [Nh, h*w, d] -> [Nh, h*w, h*w]."""
    out = torch.zeros(q.shape[0], height * width, height * width)
    for i in range(height):
        for j in range(width):
            for a in range(height):
                for b in range(width):
                    out[:, i * width + j, a * width + b] = q[:, i * width + j] @ (
                        rel_w[b - j + width - 1] + rel_h[a - i + height - 1])
    return out


# --- The layer ---

def test_relative_logits_match_the_direct_computation_on_a_non_square_map():
    torch.manual_seed(0)
    layer = AugmentedConv2d(8, 16, dk=8, dv=8, num_heads=2, feat_size=(3, 4))
    q, _, _, height, width = layer.queries_keys_values(torch.randn(2, 8, 3, 4))
    logits = layer.relative_logits(q, height, width)
    assert logits.shape == (2, 2, 12, 12)
    for n in range(2):
        expected = direct_relative_logits(q[n], layer.key_rel_h, layer.key_rel_w, height, width)
        torch.testing.assert_close(logits[n], expected)


def test_forward_is_conv_channels_then_the_direct_attention():
    """Channels [0, out - dv) are the convolution, the last dv the heads' softmax(q k^T + rel) v through W^O;
    the 1x1 conv's outputs split as k, q, v (the paper's order), head h on the h-th slice."""
    torch.manual_seed(0)
    layer = AugmentedConv2d(8, 20, dk=8, dv=4, num_heads=2, feat_size=(3, 4)).eval()
    x = torch.randn(2, 8, 3, 4)
    with torch.no_grad():
        out = layer(x)
        assert out.shape == (2, 20, 3, 4)
        torch.testing.assert_close(out[:, :16], layer.conv(x))
        kqv = torch.einsum("oc,nchw->nohw", layer.kqv.weight[:, :, 0, 0], x) + layer.kqv.bias[:, None, None]
        k, q, v = kqv.flatten(2).split([8, 8, 4], dim=1)  # [N, d, hw]
        heads = []
        for h in range(2):
            qh, kh, vh = q[:, 4 * h:4 * h + 4] * 4 ** -0.5, k[:, 4 * h:4 * h + 4], v[:, 2 * h:2 * h + 2]
            rel = torch.stack([direct_relative_logits(qh[n].T[None], layer.key_rel_h, layer.key_rel_w, 3, 4)[0]
                               for n in range(2)])
            weights = torch.softmax(qh.transpose(1, 2) @ kh + rel, dim=-1)  # [N, hw, hw]
            heads.append(vh @ weights.transpose(1, 2))  # [N, dvh, hw]
        attn = torch.einsum("oc,nch->noh", layer.proj.weight[:, :, 0, 0], torch.cat(heads, 1))
        attn = attn + layer.proj.bias[:, None]
        torch.testing.assert_close(out[:, 16:], attn.reshape(2, 4, 3, 4))


def test_position_logits_are_translation_equivariant():
    """Without the content term the logits depend on the offset only: shifting the input by (di, dj) shifts
    query and key together and leaves each logit as it was."""
    torch.manual_seed(0)
    layer = AugmentedConv2d(8, 16, dk=8, dv=8, num_heads=2, feat_size=(6, 5))
    x = torch.randn(1, 8, 6, 5)
    di, dj = 2, 1
    shifted = torch.roll(x, shifts=(di, dj), dims=(2, 3))
    with torch.no_grad():
        logits = layer.relative_logits(*_q_and_size(layer, x)).reshape(2, 6, 5, 6, 5)
        moved = layer.relative_logits(*_q_and_size(layer, shifted)).reshape(2, 6, 5, 6, 5)
    torch.testing.assert_close(moved[:, di:, dj:, di:, dj:], logits[:, :6 - di, :5 - dj, :6 - di, :5 - dj])
    # and the offset alone decides: one query vector everywhere gives the same logits for every equal offset
    q = torch.randn(1, 2, 1, 4).expand(1, 2, 30, 4)
    constant = layer.relative_logits(q, 6, 5).reshape(2, 6, 5, 6, 5)
    torch.testing.assert_close(constant[:, 1:, 1:, 1:, 1:], constant[:, :-1, :-1, :-1, :-1])


def _q_and_size(layer: AugmentedConv2d, x: torch.Tensor):
    q, _, _, height, width = layer.queries_keys_values(x)
    return q, height, width


def test_strided_attention_runs_on_the_average_pooled_map():
    torch.manual_seed(0)
    strided = AugmentedConv2d(8, 16, stride=2, dk=8, dv=8, num_heads=2, feat_size=4)
    plain = AugmentedConv2d(8, 16, stride=1, dk=8, dv=8, num_heads=2, feat_size=4)
    plain.load_state_dict(strided.state_dict())
    x = torch.randn(2, 8, 8, 8)
    with torch.no_grad():
        out = strided(x)
        assert out.shape == (2, 16, 4, 4)
        pooled = F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=False)
        torch.testing.assert_close(out[:, 8:], plain.attention(pooled))
        # attn_pool (the paper's memory saving): attention at 2x2, upsampled to the convolution's 4x4
        saving = AugmentedConv2d(8, 16, stride=2, dk=8, dv=8, num_heads=2, feat_size=2, attn_pool=True)
        assert saving(x).shape == (2, 16, 4, 4) and saving.key_rel_h.shape == (3, 4)


def test_resized_tables_keep_offset_zero_and_the_ends():
    table = torch.randn(7, 3)  # a map of 4
    wider = aa.resize_rel_table(table, 7)  # a map of 7: 13 offsets
    assert wider.shape == (13, 3)
    torch.testing.assert_close(wider[[0, 6, 12]], table[[0, 3, 6]])
    torch.testing.assert_close(aa.resize_rel_table(table, 1), table[3:4])


def test_attention_dims_of_the_papers_resnet50():
    """kappa = 2 upsilon = 0.2, >= 20 key dims a head, dv a multiple of the 8 heads: stages 2-4 of ResNet-50."""
    assert [aa.attention_dims(width, 8, 0.2, 0.1, 20) for width in (128, 256, 512)] == [(160, 8), (160, 24), (160, 48)]


# --- The network ---

def test_registered_sizes_build_by_name_and_refuse_pretrained():
    for name in ("aa_resnet_cpu", "aa_resnet26", "aa_resnet50"):
        assert timm.is_model(name)
        with pytest.raises(ValueError, match="no weights"):
            timm.create_model(name, pretrained=True)


def test_cpu_size_shapes_and_head():
    model = cpu_model(in_chans=1, drop_path_rate=0.1, dynamic_img_size=True).eval()
    images = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        tokens = model.forward_embed(images)
        assert tokens.shape == (2, 8, 8, model.embed_dim) and model.patch_stride == 4
        features = model.forward_stages(tokens)
        assert model.output_fmt == "NCHW" and features.shape == (2, model.num_features, 2, 2)
        torch.testing.assert_close(model.forward_features(images), features)
        assert model.forward_head(features, pre_logits=True).shape == (2, model.num_features)
        assert model.forward_head(features).shape == model(images).shape == (2, 10)
        model.reset_classifier(0, global_pool="")
        assert model.forward_head(features).shape == features.shape and model.get_classifier() is model.fc
        model.reset_classifier(5, global_pool="")
        assert model.forward_head(features).shape == (2, 5, 2, 2)
    assert sum(p.numel() for p in model.parameters()) < 2e6


def test_feature_info_and_sizes():
    model = cpu_model()
    assert [(f["num_chs"], f["reduction"], f["module"]) for f in model.feature_info] == [
        (24, 2, "act1"), (96, 4, "layer1"), (192, 8, "layer2"), (384, 16, "layer3"), (768, 16, "layer4")]
    assert model.size_multiple == 16
    assert timm.create_model("aa_resnet50", pretrained=False, num_classes=0).size_multiple == 32
    with pytest.raises(ValueError, match="30x32"):
        model.forward_features(torch.randn(1, 3, 30, 32))
    with pytest.raises(ValueError, match="multiple of 16"):
        cpu_model(img_size=40)
    with torch.no_grad():  # other multiples: the tables are resampled to the maps
        assert model.eval().forward_features(torch.randn(1, 3, 48, 64)).shape == (1, 768, 3, 4)


def test_parameter_count_of_aa_resnet50_matches_the_paper():
    """The paper's table: AA-ResNet-50 25.8 M, ResNet-50 25.6 M; unaugmented, ours is timm's resnet50 exactly
    (names and shapes), and the ResNet-26 configuration is the paper's 13.7 M ResNet-26."""
    with torch.device("meta"):
        model = timm.create_model("aa_resnet50")
        plain = timm.create_model("aa_resnet50", augment=(False,) * 4)
        resnet50 = timm.create_model("resnet50")
        resnet26 = timm.create_model("aa_resnet26", augment=(False,) * 4)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 25.8e6) / 25.8e6 < 0.01, count
    assert {k: v.shape for k, v in plain.state_dict().items()} == {k: v.shape for k, v in resnet50.state_dict().items()}
    assert abs(sum(p.numel() for p in resnet26.parameters()) - 13.7e6) / 13.7e6 < 0.01


def test_unaugmented_network_computes_what_timms_resnet_does():
    from timm.models.resnet import Bottleneck, ResNet

    torch.manual_seed(0)
    reference = ResNet(Bottleneck, (1, 1, 1, 1), channels=(16, 32, 64, 128), num_classes=7).eval()
    randomise_norms(reference)
    ours = AAResNet(layers=(1, 1, 1, 1), channels=(16, 32, 64, 128), augment=(False,) * 4, img_size=32,
                    num_classes=7).eval()
    ours.load_state_dict(reference.state_dict())
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(images), reference(images))


def test_checkpoint_filter_passes_our_dict_and_fits_tables_to_another_size():
    small = cpu_model().eval()
    randomise_norms(small)
    state = small.state_dict()
    filtered = aa.checkpoint_filter_fn(state, small)
    assert filtered.keys() == state.keys() and all(filtered[k] is state[k] for k in state)
    large = cpu_model(img_size=64).eval()
    large.load_state_dict(aa.checkpoint_filter_fn(state, large))  # strict
    assert large.layer2[0].conv2.key_rel_h.shape == (15, 8) and small.layer2[0].conv2.key_rel_h.shape == (7, 8)
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():  # resampled once in the checkpoint or at every forward: the same model
        torch.testing.assert_close(large(images), small(images))


def test_grad_checkpointing_gives_the_same_outputs_and_grads():
    model = cpu_model()
    randomise_norms(model)
    images = torch.randn(2, 3, 32, 32)

    def run(enable: bool):
        model.zero_grad()
        model.set_grad_checkpointing(enable)
        out = model(images)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    out, grads = run(False)
    calls = []
    original = aa.checkpoint
    aa.checkpoint = lambda *args, **kwargs: calls.append(kwargs) or original(*args, **kwargs)
    try:
        checkpointed_out, checkpointed_grads = run(True)
    finally:
        aa.checkpoint = original
    assert len(calls) == 4 and all(call["use_reentrant"] is False for call in calls)
    torch.testing.assert_close(checkpointed_out, out)
    assert grads["layer3.0.conv2.key_rel_w"].abs().sum() > 0
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed_grads[name], grad, msg=name)


def test_layer_decay_gives_each_block_its_own_scale_and_no_decay_to_the_tables():
    model = timm.create_model("aa_resnet26", img_size=64, num_classes=10)
    no_decay = model.no_weight_decay()
    assert len(no_decay) == 2 * (2 + 4 + 1) and all(name.endswith(("key_rel_h", "key_rel_w")) for name in no_decay)
    groups = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=no_decay, layer_decay=0.75)
    scales = {group["lr_scale"] for group in groups}
    assert len(scales) == 8 + 2  # the stem, each of the 8 blocks, the head
    assert max(scales) == 1.0 and min(scales) == pytest.approx(0.75 ** 9)
    grouped = [p for group in groups for p in group["params"]]
    assert len(grouped) == len(list(model.parameters()))
    assert {id(p) for p in grouped} == {id(p) for p in model.parameters()}
    tables = {id(p) for n, p in model.named_parameters() if n in no_decay}
    assert all(group["weight_decay"] == 0 for group in groups if tables & {id(p) for p in group["params"]})
    coarse = timm.models.group_parameters(model, model.group_matcher(coarse=True))
    assert len(coarse) == 4 + 2
