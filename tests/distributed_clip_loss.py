"""Run under `torchrun --nproc_per_node 2`: CLIPTask's gathered loss and DDP-averaged gradients on each process's
half of a global batch, against one process computing the same global batch alone. Rank 0 writes a JSON report."""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from clip_helpers import write_tiny_clip_config
from pretrain.models.clip import create_clip, tokenizer_for
from pretrain.tasks import CLIPTask


def main(config_dir: str, report_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same weights and the same global batch on both processes
    model, name, _ = create_clip(str(write_tiny_clip_config(config_dir, f"test-tiny-clip-{rank}")))
    captions = [f"caption number {i}" for i in range(8)]
    batch = {"image": torch.randn(8, 3, 16, 16), "text": tokenizer_for(name)(captions)}

    alone = CLIPTask(world_size=1)(model, batch)["loss"]
    alone.backward()
    grads_alone = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    half = slice(rank * 4, rank * 4 + 4)
    local = CLIPTask(rank=rank, world_size=world)(model, {k: v[half] for k, v in batch.items()})["loss"]
    local.backward()
    mean_loss = local.detach().clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    worst_grad = worst_relative = 0.0
    for param, reference in zip(model.parameters(), grads_alone):
        dist.all_reduce(param.grad)
        param.grad /= world  # what DDP does to the gradients
        difference = float((param.grad - reference).abs().max())
        worst_grad = max(worst_grad, difference)
        # against the tensor's largest gradient: float32 sums in another order differ by its rounding, not by 1e-5
        worst_relative = max(worst_relative, difference / max(float(reference.abs().max()), 1e-12))
    if rank == 0:
        with open(report_path, "w") as f:
            json.dump({"alone": float(alone), "two_processes": float(mean_loss), "local": float(local),
                       "max_grad_difference": worst_grad,
                       "max_grad_relative_difference": worst_relative}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
