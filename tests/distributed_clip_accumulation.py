"""Run under `torchrun --nproc_per_node 2`: CLIPTask's gradient accumulation (2 micro-batches of 16 per process) under
accelerate's DDP and the engine's `micro_step`, against one process computing the whole batch of 64 alone. Rank 0
writes a JSON report."""
from __future__ import annotations

import json
import sys
from functools import partial

import torch
import torch.distributed as dist
from accelerate import Accelerator

from clip_helpers import write_tiny_clip_config
from pretrain.engine import micro_step
from pretrain.models.clip import create_clip, tokenizer_for
from pretrain.tasks import CLIPTask


def main(config_dir: str, report_path: str) -> None:
    accelerator = Accelerator(gradient_accumulation_steps=2, cpu=True)  # gloo process group, DDP in prepare
    rank, world = accelerator.process_index, accelerator.num_processes
    torch.manual_seed(0)  # the same weights and the same global batch on both processes
    model, name, _ = create_clip(str(write_tiny_clip_config(config_dir, f"test-tiny-clip-acc-{rank}")))
    captions = [f"caption number {i}" for i in range(64)]
    batch = {"image": torch.randn(64, 3, 16, 16), "text": tokenizer_for(name)(captions)}

    alone = CLIPTask(world_size=1)(model, batch)["loss"]
    alone.backward()
    grads_alone = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    ddp = accelerator.prepare(model)
    rows = range(rank * 32, rank * 32 + 32, 16)  # this process's 32 rows as 2 micro-batches of 16
    micro_batches = [{k: v[start:start + 16] for k, v in batch.items()} for start in rows]
    logged = CLIPTask(rank=rank, world_size=world).step_micro_batches(ddp, micro_batches,
                                                                      partial(micro_step, accelerator, ddp))
    mean_loss = logged["loss"].clone()
    dist.all_reduce(mean_loss)
    mean_loss /= world
    worst_grad = max(float((p.grad - reference).abs().max()) for p, reference in zip(model.parameters(), grads_alone))
    worst = torch.tensor(worst_grad)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    if rank == 0:
        with open(report_path, "w") as f:
            json.dump({"alone": float(alone.detach()), "two_processes": float(mean_loss),
                       "max_grad_difference": float(worst), "synced_at_the_end": accelerator.sync_gradients}, f)
    accelerator.wait_for_everyone()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
