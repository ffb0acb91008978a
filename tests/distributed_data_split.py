"""Run under `torchrun --nproc_per_node 2`: every process streams its share of the same shards, through 2
DataLoader workers each, in evaluation mode (one pass) and in finite training mode (two passes); the keys each
process read are gathered and rank 0 writes them to a JSON report for the test to check."""
from __future__ import annotations

import json
import sys

import torch.distributed as dist

from data import ShardStream
from stream_helpers import as_uint8_tensor, collect, keys_of


def main(shards: str, report_path: str, batches_per_pass: int) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    evaluation = ShardStream(shards, as_uint8_tensor(), batch_size=3, train=False, rank=rank, world_size=world)
    training = ShardStream(shards, as_uint8_tensor(), batch_size=4, train=True, rank=rank, world_size=world,
                           shuffle_buffer=5)
    batches = collect(training, num_workers=2, max_batches=2 * batches_per_pass)
    mine = {
        "evaluation": keys_of(collect(evaluation, num_workers=2)),
        "pass 1": keys_of(batches[:batches_per_pass]),
        "pass 2": keys_of(batches[batches_per_pass:]),
    }
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        with open(report_path, "w") as f:
            json.dump(everyone, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))
