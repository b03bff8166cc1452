"""All distributed code lives here. With one process every function is a no-op; nothing runs at import."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main_process() -> bool:
    return rank() == 0


class _AllGather(torch.autograd.Function):
    """all_gather whose backward hands each rank the summed gradient of its own rows."""

    @staticmethod
    def forward(ctx, local: Tensor) -> Tensor:  # type: ignore[override]
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        ctx.rows = local.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        # Every rank's loss depends on every row, so a row's gradient is the sum over ranks.
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        start = dist.get_rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(local: Tensor) -> tuple[Tensor, int]:
    """Concatenate (n, d) rows of all ranks into (world * n, d), keeping gradients.

    Returns the global tensor and the offset of this rank's rows in it. Ranks must hold equal n.
    """
    if not is_distributed() or dist.get_world_size() == 1:
        return local, 0
    return _AllGather.apply(local), dist.get_rank() * local.shape[0]
