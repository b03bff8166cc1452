"""All distributed code lives here. With one process every function is a no-op; nothing runs at import.

Convention used by the engine and the meta step: the objective of a multi-process step is the *sum*
over ranks of each rank's local share (its rows against the global batch), and every collective
below differentiates accordingly. The collectives' backward functions are themselves built from
differentiable collectives, so the second-order graph of the meta step crosses ranks correctly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import FunctionCtx


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


@dataclass(frozen=True)
class DistContext:
    """Where this process sits: global rank and world size, and the device it trains on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialized_here: bool  # this call started the process group, so cleanup() ends it


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group described by torchrun's environment (``WORLD_SIZE``, ``RANK`` ...).

    Without those variables (or with ``WORLD_SIZE=1``) nothing is initialised and the context
    describes a single process. CUDA ranks use NCCL on ``cuda:LOCAL_RANK``; CPU ranks use gloo.
    ``device`` is the config's ``train.device`` ("auto", "cpu", "cuda", ...).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    requested = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else "cpu" if device == "auto" else device
    )
    use_cuda = requested.type == "cuda"
    if use_cuda:
        # One GPU per rank, chosen by torchrun's LOCAL_RANK; a single process keeps the named index.
        target = torch.device("cuda", local_rank if world > 1 else (requested.index or 0))
    else:
        target = requested
    if world <= 1:
        return DistContext(0, 1, 0, target, False)
    started = False
    if not dist.is_initialized():
        if use_cuda:
            torch.cuda.set_device(target)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        started = True
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, target, started)


def cleanup(ctx: DistContext, failed: bool = False) -> None:
    """End the process group this process started. After success all ranks meet at a barrier first
    (gloo aborts without one); after a failure the other ranks may never arrive, so no barrier."""
    if ctx.initialized_here and dist.is_initialized():
        if not failed:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


class _AllGather(torch.autograd.Function):
    """(n, ...) per rank -> (world * n, ...) in rank order. Backward: each rank receives the sum over
    ranks of the gradient of its own rows (a reduce-scatter), itself differentiable."""

    @staticmethod
    def forward(ctx: FunctionCtx, local: Tensor) -> Tensor:
        parts = [torch.empty_like(local) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, local.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> Tensor:
        return _ReduceScatterSum.apply(grad)


class _ReduceScatterSum(torch.autograd.Function):
    """(world * n, ...) per rank -> this rank's (n, ...) rows summed over ranks. Backward: all-gather."""

    @staticmethod
    def forward(ctx: FunctionCtx, full: Tensor) -> Tensor:
        # gloo has no reduce_scatter: an all-reduce then a slice gives the same rows.
        total = full.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        rows = full.shape[0] // dist.get_world_size()
        start = dist.get_rank() * rows
        return total[start : start + rows].clone()

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> Tensor:
        return _AllGather.apply(grad)


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks, replicated on every rank. For an objective summed over ranks the backward is
    again a sum over ranks."""

    @staticmethod
    def forward(ctx: FunctionCtx, local: Tensor) -> Tensor:
        total = local.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx: FunctionCtx, grad: Tensor) -> Tensor:
        return _AllReduceSum.apply(grad)


def gather_with_grad(local: Tensor) -> tuple[Tensor, int]:
    """Concatenate (n, d) rows of all ranks into (world * n, d), keeping gradients (any order).

    Returns the global tensor and the offset of this rank's rows in it. Ranks must hold equal n.
    """
    if not is_distributed():
        return local, 0
    return _AllGather.apply(local), dist.get_rank() * local.shape[0]


def all_reduce_sum(value: Tensor) -> Tensor:
    """Sum of ``value`` over ranks; differentiable when ``value`` requires grad; identity alone."""
    if not is_distributed():
        return value
    if value.requires_grad:
        return _AllReduceSum.apply(value)
    total = value.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total


def all_reduce_sum_(tensors: list[Tensor]) -> None:
    """In-place sum over ranks of several tensors (e.g. gradients), in one flat message."""
    if not is_distributed() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def gather_rows(local: Tensor) -> Tensor:
    """Concatenate row blocks of *different* lengths from all ranks, in rank order, without grad.

    Used by evaluation, where the last rank may hold fewer items: blocks are padded to the longest for
    the collective and the padding is cut off again, so no item is duplicated or lost.
    """
    if not is_distributed():
        return local
    sizes = [torch.zeros(1, dtype=torch.long, device=local.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([local.shape[0]], device=local.device))
    counts = [int(s.item()) for s in sizes]
    longest = max(counts)
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:count] for part, count in zip(parts, counts, strict=True)])


def shard_range(total: int, rank_: int | None = None, world: int | None = None) -> range:
    """This rank's contiguous share of ``total`` items (sizes differ by at most one, none repeated)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    base, extra = divmod(total, world)
    start = rank_ * base + min(rank_, extra)
    return range(start, start + base + (1 if rank_ < extra else 0))


def broadcast_object(obj: object) -> object:
    """Rank 0's ``obj`` on every rank (identity alone)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` alone). For small bookkeeping, not tensors."""
    if not is_distributed():
        return [obj]
    out: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
