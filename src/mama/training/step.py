"""The meta-weighted training step, written once for every task (and the benchmarks).

    1. per-sample losses of this rank's rows (one forward, shared by the meta step and the update)
    2. sample weights: uniform, or from the weighting net after its meta update (Meta-Weight-Net's bilevel step; README "Method notes")
    3. the real update on the weighted loss, with gradient scaling, clipping and the schedule

Under DDP ``step_module`` is the wrapper and ``state.module`` the module inside it: the real update
goes through DDP (gradient all-reduce overlapped with backward), while the exact meta step
differentiates the same training forward with ``torch.autograd.grad`` to explicit inputs, which does
not fire DDP's reduction hooks; its meta-batch forward and the first-order probe run on the module.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from mama.config import Precision
from mama.distributed import gather_rows, rank
from mama.precision import autocast
from mama.training.state import TrainState
from mama.weighting import meta_forward_context, small_loss_weights


@dataclass(frozen=True)
class StepSettings:
    precision: Precision = "fp32"
    accum_steps: int = 1  # micro-batches per rank; negatives still span the whole batch
    world_size: int = 1
    grad_clip: float = 0.0  # max global gradient norm; 0 disables
    drop_frac: float = 0.0  # small-loss trick: weight 0 on this fraction of the global batch's highest losses


@dataclass
class StepOutput:
    """What one step computed; tensors detached, (n,) over this rank's rows."""

    loss_per_sample: Tensor
    weights: Tensor  # sum to 1 over the global batch
    meta_loss: float | None  # None: no meta update this step
    grad_norm: Tensor | None  # before clipping; None without clipping


def split_batch(batch: Mapping[str, Tensor], parts: int) -> list[dict[str, Tensor]]:
    """(n, ...) tensors -> ``parts`` micro-batches of n / parts rows, in order."""
    return [
        dict(zip(batch, values, strict=True)) for values in zip(*(v.chunk(parts) for v in batch.values()), strict=True)
    ]


def micro_rows(rows: int, parts: int) -> list[slice]:
    """The rows of each of ``parts`` equal micro-batches of a ``rows``-row batch."""
    return [slice(j * rows // parts, (j + 1) * rows // parts) for j in range(parts)]


@dataclass
class _Losses:
    losses: Tensor  # (n,) with graph (no accumulation) or detached
    weights: Tensor  # (n,) detached
    meta_loss: float | None
    cache: Any  # accumulation: the gradient-free batch cache
    micro: list[dict[str, Tensor]]


def meta_weighted_step(
    state: TrainState,
    batch: dict[str, Tensor],
    meta_batch: Mapping[str, Any] | None,
    step: int,
    settings: StepSettings,
    step_module: nn.Module | None = None,
) -> StepOutput:
    """One optimiser step of ``state`` on this rank's ``batch``; ``meta_batch`` is given on meta steps.

    ``step_module``: what the real update calls (the DDP wrapper of ``state.module``; default the module).
    """
    exact = meta_batch is not None and state.meta is not None and state.meta.cfg.method == "exact"
    result = _losses_and_weights(state, batch, meta_batch, step, settings, step_module or state.module, exact)
    grad_norm = _weighted_update(state, result, settings, step_module or state.module, exact)
    return StepOutput(result.losses.detach(), result.weights, result.meta_loss, grad_norm)


def _losses_and_weights(
    state: TrainState, batch: dict[str, Tensor], meta_batch: Mapping[str, Any] | None, step: int,
    settings: StepSettings, step_module: nn.Module, exact: bool,
) -> _Losses:  # fmt: skip
    module, meta, accum = state.module, state.meta, settings.accum_steps
    device = next(module.parameters()).device
    micro = split_batch(batch, accum)
    cache, partial_losses = None, None
    with meta_forward_context(exact), autocast(device, settings.precision):
        # Without accumulation the losses keep their graph and serve both the meta step and the real
        # update (one forward). With accumulation they come from cached, gradient-free results.
        if accum == 1:
            losses = step_module(batch)["loss_per_sample"]
        else:
            cache = module.cache_batch(micro)  # type: ignore[operator]
            with torch.no_grad():
                losses = module.cached_loss(cache)  # type: ignore[operator]
            if exact:
                rows = micro_rows(len(losses), accum)
                partial_losses = [module(mb, cache.at(r))["loss_per_sample"] for mb, r in zip(micro, rows, strict=True)]
        if meta is not None:
            result = meta.step(
                module, losses, meta_batch, step, partial_losses,
                train_forward=lambda params: functional_call(module, params, (batch,))["loss_per_sample"],
            )  # fmt: skip
            weights, meta_loss = result.weights, result.meta_loss
        elif settings.drop_frac > 0:
            # Over the global batch, as the meta weights are: every rank ranks the same gathered losses.
            global_losses = gather_rows(losses.detach())
            start = rank() * len(losses)  # every rank holds the same number of rows
            weights = small_loss_weights(global_losses, settings.drop_frac)[start : start + len(losses)]
            meta_loss = None
        else:
            weights = torch.full_like(losses, 1.0 / (len(losses) * settings.world_size))
            meta_loss = None
    return _Losses(losses, weights.detach(), meta_loss, cache, micro)


def _weighted_update(
    state: TrainState, result: _Losses, settings: StepSettings, step_module: nn.Module, exact: bool
) -> Tensor | None:
    """The real update. Each rank's loss is its share of the global weighted sum; DDP averages gradients
    over ranks, hence the factor world size."""
    module, scaler, world, weights = state.module, state.scaler, settings.world_size, result.weights
    state.optimizer.zero_grad(set_to_none=True)
    if settings.accum_steps == 1:
        # Same attention backend as the forward: gradient checkpointing recomputes in backward.
        with meta_forward_context(exact):
            scaler.scale(world * (weights * result.losses).sum()).backward()
    else:
        device = next(module.parameters()).device
        rows = micro_rows(len(weights), settings.accum_steps)
        for j, (mb, r) in enumerate(zip(result.micro, rows, strict=True)):
            # Gradients are all-reduced once, in the last micro-batch's backward.
            sync = nullcontext() if world == 1 or j == settings.accum_steps - 1 else step_module.no_sync()  # type: ignore[operator]
            with sync, autocast(device, settings.precision):
                part = step_module(mb, result.cache.at(r))["loss_per_sample"]
                scaler.scale(world * (weights * part).sum()).backward()
    scaler.unscale_(state.optimizer)
    grad_norm = nn.utils.clip_grad_norm_(module.parameters(), settings.grad_clip) if settings.grad_clip > 0 else None
    scaler.step(state.optimizer)
    scaler.update()
    state.scheduler.step()
    module.after_optimizer_step()  # type: ignore[operator]
    return grad_norm
