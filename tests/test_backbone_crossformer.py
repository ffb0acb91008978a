"""CrossFormer v1 (pretrain/models/backbones/crossformer.py): the package contract, the published sizes, the
official logits (fixtures written by the official code: tests/fixtures/crossformer_make_official_fixture.py) and
what LSDA and the DPB mean: which tokens a layer mixes, and a position bias for groups of any shape."""
from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from timm.optim import param_groups_layer_decay

from pretrain.models.backbones import load_official_checkpoint
from pretrain.models.backbones.crossformer import (  # importing it registers crossformer_* with timm
    Attention,
    CrossFormer,
    checkpoint_filter_fn,
    relative_coordinates,
)

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OFFICIAL_WEIGHTS = FIXTURES / "crossformer_official_tiny.pth"
OFFICIAL_IO = FIXTURES / "crossformer_official_tiny_io.pt"

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def official_io() -> dict:
    return torch.load(OFFICIAL_IO, weights_only=True)


def cpu_model(**kwargs) -> CrossFormer:
    torch.manual_seed(0)
    return timm.create_model("crossformer_cpu", num_classes=10, **kwargs).eval()


# ------------------------------------------------------------------------------------------------ sizes and hooks

@pytest.mark.parametrize("name, millions", [("crossformer_tiny", 27.8), ("crossformer_small", 30.7),
                                            ("crossformer_base", 52.0), ("crossformer_large", 92.0)])
def test_published_sizes_have_the_papers_parameter_counts(name, millions):
    with torch.device("meta"):
        model = timm.create_model(name)
    assert model.patch_embed.img_size == (224, 224) and model.size_multiple == 32
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, rel=0.01)


def test_crossformer_tiny_is_the_published_architecture():
    with torch.device("meta"):
        model = timm.create_model("crossformer_tiny")
    assert [len(stage.blocks) for stage in model.layers] == [1, 1, 8, 6]
    assert [stage.blocks[0].attn.num_heads for stage in model.layers] == [2, 4, 8, 16]
    assert [conv.kernel_size[0] for conv in model.patch_embed.projs] == [4, 8, 16, 32]
    assert [conv.out_channels for conv in model.patch_embed.projs] == [32, 16, 8, 8]  # 1/2, 1/4, 1/8, 1/8
    assert [conv.out_channels for conv in model.layers[0].downsample.reductions] == [64, 64]
    assert [stage.blocks[0].interval for stage in model.layers] == [(8, 8), (4, 4), (2, 2), (1, 1)]
    # the 7x7 last stage is one group: its DPB buffers are sized for 7x7 as everywhere else
    assert model.layers[3].blocks[0].attn.relative_position_index.shape == (49, 49)
    assert model.layers[3].blocks[0].grouping(7, 7) == (False, (7, 7))


def test_cpu_size_outputs_and_hooks():
    model = cpu_model()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = model.forward_embed(images)
        features = model.forward_stages(tokens)
        assert tokens.shape == (2, 8, 8, model.embed_dim) and model.patch_stride == 4
        assert torch.equal(features, model.forward_features(images))
        assert features.shape == (2, 2, 2, model.num_features) == (2, 2, 2, 128) and model.output_fmt == "NHWC"
        assert model.forward_head(features).shape == (2, 10)
        assert model.forward_head(features, pre_logits=True).shape == (2, 128)
        assert torch.allclose(model(images), model.head(features.mean(dim=(1, 2))))
    assert model.get_classifier() is model.head
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 2e6
    model.reset_classifier(0, global_pool="")
    with torch.no_grad():
        assert model(images).shape == (2, 2, 2, 128)  # the map itself
    model.reset_classifier(5, global_pool="avg")
    with torch.no_grad():
        assert model(images).shape == (2, 5)


def test_timm_common_kwargs():
    model = timm.create_model("crossformer_cpu", in_chans=1, num_classes=3, global_pool="", drop_path_rate=0.1,
                              img_size=64, dynamic_img_size=True)
    assert model.patch_embed.img_size == (64, 64) and model.layers[1].blocks[1].drop_path.drop_prob > 0
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 4, 4, 3)
    with pytest.raises(ValueError, match="pretrained"):
        timm.create_model("crossformer_tiny", pretrained=True)
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("crossformer_cpu", global_pool="max")


def test_feature_info_names_each_stages_map():
    model = cpu_model()
    maps = []
    for info in model.feature_info:
        model.get_submodule(info["module"]).register_forward_hook(lambda module, args, out: maps.append(out))
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    assert [(info["num_chs"], info["reduction"]) for info in model.feature_info] == [(32, 4), (64, 8), (128, 16)]
    assert [m.shape for m in maps] == [(2, 32 // r, 32 // r, c) for c, r in ((32, 4), (64, 8), (128, 16))]
    features = timm.create_model("crossformer_cpu", features_only=True, out_indices=(1, 2))  # timm's hooks on them
    with torch.no_grad():
        assert [f.shape for f in features(torch.randn(2, 3, 32, 32))] == [(2, 4, 4, 64), (2, 2, 2, 128)]


def test_sizes_are_multiples_of_size_multiple():
    model = cpu_model()
    assert model.size_multiple == 16  # 3 stages: stride 4, two mergings
    with torch.no_grad():
        assert model.forward_features(torch.randn(1, 3, 48, 64)).shape == (1, 3, 4, 128)  # maps padded per block
        for bad in ((40, 32), (32, 36)):
            with pytest.raises(ValueError, match=f"{bad[0]}x{bad[1]}"):
                model(torch.randn(1, 3, *bad))
        with pytest.raises(ValueError, match="12x8"):
            model.forward_stages(torch.zeros(1, 3, 2, 32))
    with pytest.raises(ValueError, match="img_size"):
        timm.create_model("crossformer_cpu", img_size=40)


def test_grad_checkpointing_recomputes_blocks_with_the_same_outputs_and_grads():
    model = cpu_model()
    images = torch.randn(2, 3, 32, 32)
    calls = []
    for stage in model.layers:
        for block in stage.blocks:
            block.register_forward_pre_hook(lambda module, args: calls.append(1))

    def run():
        model.zero_grad()
        calls.clear()
        out = model(images)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, len(calls)

    plain_out, plain_grads, plain_calls = run()
    model.set_grad_checkpointing(True)
    ckpt_out, ckpt_grads, ckpt_calls = run()
    assert plain_calls == 6 and ckpt_calls == 12  # every block runs again in the backward pass
    assert torch.allclose(plain_out, ckpt_out, atol=1e-6)
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, ckpt_grads[name], atol=1e-6), name
    assert all(stage.grad_checkpointing for stage in cpu_model(use_checkpoint=True).layers)


def test_layer_decay_gives_each_block_its_lr_scale():
    model = cpu_model()
    groups = param_groups_layer_decay(model, weight_decay=0.05, no_weight_decay_list=model.no_weight_decay(),
                                      layer_decay=0.75)
    blocks = sum(len(stage.blocks) for stage in model.layers)
    scales = sorted({group["lr_scale"] for group in groups})
    assert len(scales) == blocks + 2 and scales[-1] == 1.0  # embedding, each block, head
    grouped = [id(p) for group in groups for p in group["params"]]
    assert sorted(grouped) == sorted(id(p) for p in model.parameters())  # every parameter, once
    names = {id(p): name for name, p in model.named_parameters()}
    scale = {names[id(p)]: group["lr_scale"] for group in groups for p in group["params"]}
    decay = {names[id(p)]: group["weight_decay"] for group in groups for p in group["params"]}
    assert scale["patch_embed.projs.0.weight"] == scales[0] and scale["head.weight"] == 1.0
    assert scale["layers.0.downsample.reductions.0.weight"] == scale["layers.0.blocks.1.attn.qkv.weight"]
    assert scale["layers.0.blocks.1.mlp.fc1.weight"] < scale["layers.1.blocks.0.mlp.fc1.weight"]
    assert scale["norm.weight"] == scale["layers.2.blocks.1.mlp.fc2.weight"] == scales[-2]
    assert decay["layers.0.blocks.0.attn.pos.pos_proj.weight"] == 0 and decay["layers.0.blocks.0.attn.qkv.weight"] > 0


def test_no_weight_decay_is_the_position_bias_mlps():
    model = cpu_model(ape=True)
    names = model.no_weight_decay()
    assert "absolute_pos_embed" in names and "layers.0.blocks.1.attn.pos.pos_proj.weight" in names
    assert not any("qkv" in name or "mlp" in name for name in names)


# ------------------------------------------------------------------------------------------------ official parity

def test_official_checkpoint_gives_the_official_logits(official_io):
    model = CrossFormer(**official_io["config"]).eval()
    for name, value in torch.load(OFFICIAL_WEIGHTS, weights_only=True)["model"].items():
        if name.endswith(("biases", "relative_position_index")):  # the DPB buffers are the official coordinates
            assert torch.equal(model.state_dict()[name], value), name
    load_official_checkpoint(model, OFFICIAL_WEIGHTS)
    with torch.no_grad():
        logits = model(official_io["input"])
    assert torch.allclose(logits, official_io["logits"], atol=1e-4, rtol=0)


def test_checkpoint_filter_fn_passes_our_state_dict_and_fits_dpb_buffers_to_the_model():
    model = cpu_model()
    state = model.state_dict()
    assert checkpoint_filter_fn(state, model) is not state and \
        all(torch.equal(v, checkpoint_filter_fn(state, model)[k]) for k, v in state.items())
    # the same weights built for 64 px: stage 3 is one 4x4 group there (2x2 at 32), its buffers are the model's;
    # with the same intervals both models compute the same function
    big = cpu_model(img_size=64, crs_interval=(2, 1, 1))
    load_official_checkpoint(big, state)
    assert big.layers[2].blocks[0].attn.relative_position_index.shape == (16, 16)
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(big(images), model(images), atol=1e-5)


def test_dpb_gives_the_official_bias_for_a_group_it_was_not_built_for(official_io):
    """The official attention over a 3 x 5 group: ours built for 3 x 5 matches it; ours built for 4 x 4 (its
    buffers left out) computes the 3 x 5 coordinates itself and matches too."""
    recorded = official_io["attention"]
    exact = Attention(**recorded["config"]).eval()
    exact.load_state_dict(recorded["state"])
    other = Attention(recorded["config"]["dim"], (4, 4), recorded["config"]["num_heads"]).eval()
    other.load_state_dict({k: v for k, v in recorded["state"].items()
                           if not k.endswith(("biases", "relative_position_index"))}, strict=False)
    with torch.no_grad():
        for attention in (exact, other):
            assert torch.allclose(attention(recorded["input"], (3, 5)), recorded["output"], atol=1e-5)
        assert torch.allclose(other.position_bias((4, 4)), exact.position_bias((4, 4)))


def test_dpb_bias_is_the_mlp_of_each_pairs_offset():
    attention = Attention(64, (4, 4), num_heads=4)
    with torch.no_grad():
        bias = attention.position_bias((3, 5))  # [heads, 15, 15]
        coords = torch.tensor([(i, j) for i in range(3) for j in range(5)], dtype=torch.float32)
        expected = attention.pos(coords[:, None] - coords[None, :])  # [15, 15, heads]
    assert bias.shape == (4, 15, 15) and torch.allclose(bias, expected.permute(2, 0, 1), atol=1e-6)
    biases, index = relative_coordinates(4, 4)
    assert torch.equal(biases, attention.biases) and torch.equal(index, attention.relative_position_index)


# ------------------------------------------------------------------------------------------------ LSDA semantics

def mixed_by(block, height: int, width: int, token: tuple[int, int]) -> torch.Tensor:
    """[H, W] bool: which outputs of the block's attention (one layer) change when one input token changes."""
    torch.manual_seed(0)
    x = torch.randn(1, height, width, block.dim)
    moved = x.clone()
    moved[0, token[0], token[1]] += 3.0
    with torch.no_grad():
        return (block.lsda(moved) - block.lsda(x)).abs().amax(-1)[0] > 0


def test_short_distance_attention_mixes_adjacent_tokens_only():
    block = cpu_model().layers[0].blocks[0]  # SDA, G = 4
    assert block.lsda_flag == 0 and block.group_size == 4
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[4:8, 0:4] = True  # the 4x4 group of token (5, 2)
    assert torch.equal(mixed_by(block, 8, 8, (5, 2)), expected)


def test_long_distance_attention_mixes_tokens_an_interval_apart():
    block = cpu_model().layers[0].blocks[1]  # LDA, interval 2 (8x8 map / G 4)
    assert block.lsda_flag == 1 and block.interval == (2, 2)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[1::2, 0::2] = True  # every token 2 apart from (5, 2): rows 1, 3, 5, 7 x columns 0, 2, 4, 6
    assert torch.equal(mixed_by(block, 8, 8, (5, 2)), expected)


def test_groups_of_a_padded_map_hold_real_tokens_only():
    """A 6x10 map: SDA pads to 8x12 (groups of 4x4), LDA's groups are every second token; padding changes no group."""
    sda, lda = cpu_model().layers[0].blocks
    expected = torch.zeros(6, 10, dtype=torch.bool)
    expected[4:6, 8:10] = True  # the bottom-right group is 2x2 real tokens (the rest padding, masked)
    assert torch.equal(mixed_by(sda, 6, 10, (5, 9)), expected)
    expected = torch.zeros(6, 10, dtype=torch.bool)
    expected[1::2, 1::2] = True
    assert torch.equal(mixed_by(lda, 6, 10, (5, 9)), expected)


def test_a_map_no_larger_than_the_group_is_one_group():
    block = cpu_model().layers[1].blocks[1]  # LDA by position, but the 4x4 map is no larger than G = 4
    assert block.lsda_flag == 1 and block.grouping(4, 4) == (False, (4, 4))
    assert mixed_by(block, 4, 4, (0, 0)).all()
    assert block.grouping(8, 8) == (True, (1, 1))  # a larger map (larger input): LDA at the stage's interval
