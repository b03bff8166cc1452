"""Worker launched by ``torchrun`` from tests/models/test_clip_vip_distributed.py (not a test module).

Each rank takes its rows of one global batch, runs tests/test_distributed.py's ``compute_case`` on the
clip_vip case, and rank 0 saves the result to ``OUT``. Usage: ``torchrun --nproc_per_node 2 worker.py OUT CLIP``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from mama.distributed import cleanup, init_distributed, shard_range

sys.path.insert(0, str(Path(__file__).parents[1]))  # tests/: test_distributed
sys.path.insert(0, str(Path(__file__).parent))  # tests/models/: test_clip_vip_distributed
from test_clip_vip_distributed import build_case

from test_distributed import GLOBAL_BATCH, compute_case


def main(out: str, clip_folder: str) -> None:
    ctx = init_distributed("cpu")
    torch.set_num_threads(1)
    task, meta_cfg, train_batch, meta_batch = build_case(Path(clip_folder))
    rows = shard_range(GLOBAL_BATCH, ctx.rank, ctx.world_size)
    local = {k: v[rows.start : rows.stop] for k, v in train_batch.items()}
    meta_rows = shard_range(len(meta_batch["video"]), ctx.rank, ctx.world_size)
    local_meta = {k: v[meta_rows.start : meta_rows.stop] for k, v in meta_batch.items()}
    results = compute_case(task, meta_cfg, local, local_meta, ctx.world_size)
    if ctx.rank == 0:
        torch.save(results, out)
    dist.barrier()
    cleanup(ctx)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
