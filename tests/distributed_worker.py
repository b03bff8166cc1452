"""Worker launched by ``torchrun`` from tests/test_distributed.py (not a test module itself).

Each rank takes its rows of one global batch, runs ``compute_case`` (the gathered contrastive loss
and the meta steps, in float64) and an uneven gather, and rank 0 saves what it computed to ``OUT`` for the test to compare
against a single process on the whole batch. Usage: ``torchrun --nproc_per_node 2 worker.py OUT``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mama.distributed import cleanup, gather_rows, init_distributed, shard_range

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import GLOBAL_BATCH, build_case, compute_case


def main(out: str) -> None:
    ctx = init_distributed("cpu")
    torch.set_num_threads(1)
    world, rank = ctx.world_size, ctx.rank
    task, meta_cfg, train_batch, meta_batch = build_case()
    rows = shard_range(GLOBAL_BATCH, rank, world)
    local = {k: v[rows.start : rows.stop] for k, v in train_batch.items()}
    meta_rows = shard_range(len(meta_batch["video"]), rank, world)
    local_meta = {k: v[meta_rows.start : meta_rows.stop] for k, v in meta_batch.items()}
    results = compute_case(task, meta_cfg, local, local_meta, world)

    # Uneven shards (evaluation): 5 items over the ranks, gathered without padding or repeats.
    share = shard_range(5, rank, world)
    results["gather_rows"] = gather_rows(torch.arange(share.start, share.stop, dtype=torch.float64)[:, None])

    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    cleanup(ctx)


if __name__ == "__main__":
    main(sys.argv[1])
