"""The optimizer the engine builds: weight decay only on weight matrices, never on norms, biases or tokens; LARS as
MAE's util/lars.py."""
from __future__ import annotations

from pretrain.config import OptimConfig
from pretrain.engine import build_optimizer
from pretrain.models import MaskedAutoencoderViT


def test_adamw_skips_weight_decay_on_norms_biases_tokens_and_position_embeddings():
    model = MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                 decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    optimizer = build_optimizer(model, OptimConfig(name="adamw", weight_decay=0.05, betas=(0.9, 0.95)), lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    not_decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]}

    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias", "norm.bias"} <= not_decayed
    assert {"blocks.0.attn.qkv.weight", "blocks.0.mlp.fc1.weight", "decoder_pred.weight", "patch_embed.proj.weight"} <= decayed
    assert all(model.get_parameter(n).ndim > 1 for n in decayed)
    assert not any(n in decayed for n in model.no_weight_decay())
    # the fixed sin-cos embeddings are not trained at all
    assert "pos_embed" not in decayed | not_decayed and "decoder_pos_embed" not in decayed | not_decayed
    assert optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def test_lars_for_the_probe():
    import torch

    head = torch.nn.Linear(8, 3)
    optimizer = build_optimizer(head, OptimConfig(name="lars", weight_decay=0.0, momentum=0.9), lr=0.1)
    assert type(optimizer).__name__ == "Lars"
    assert all(g["momentum"] == 0.9 for g in optimizer.param_groups)


def test_lars_steps_as_maes_lars_weight_matrices_by_trust_ratio_biases_plain():
    """MAE's util/lars.py: for a weight matrix, dp = grad + wd * w scaled by 0.001 * ||w|| / ||dp|| (also at weight
    decay 0, the linear probe's setting); a bias takes the plain step. The first momentum step is the step itself."""
    import torch

    for weight_decay in (0.0, 0.05):
        torch.manual_seed(0)
        head = torch.nn.Linear(8, 3)
        weight, bias = head.weight.detach().clone(), head.bias.detach().clone()
        head.weight.grad, head.bias.grad = torch.randn(3, 8), torch.randn(3)
        optimizer = build_optimizer(head, OptimConfig(name="lars", weight_decay=weight_decay, momentum=0.9), lr=0.1)
        optimizer.step()

        update = head.weight.grad + weight_decay * weight
        expected_weight = weight - 0.1 * 0.001 * weight.norm() / update.norm() * update
        torch.testing.assert_close(head.weight.detach(), expected_weight)
        torch.testing.assert_close(head.bias.detach(), bias - 0.1 * head.bias.grad)
