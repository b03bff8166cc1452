"""Meta-learned sample weighting (Meta-Weight-Net style; MAMA, Nguyen et al., ECCV 2024).

A tiny MLP maps each sample's loss to a weight in (0, 1). It learns by bilevel optimisation: a virtual
SGD step of the model on the weighted training loss, then the *unweighted* loss of those virtual
parameters on a clean meta batch, differentiated back into the weighting net through the virtual step
(second order). The virtual step is functional (``torch.func.functional_call``): parameters are never
assigned, so the real model is untouched until the real optimiser step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from mama.config import MetaConfig
from mama.distributed import all_reduce_sum, all_reduce_sum_, world_size


def small_loss_weights(losses: Tensor, drop_frac: float) -> Tensor:
    """The small-loss trick's sample weights: (n,) losses of the whole (global) batch -> (n,) weights, 0
    for the ``round(drop_frac * n)`` highest losses and equal for the rest, summing to 1. Ties at the
    threshold are broken by position, so exactly that many samples are dropped."""
    n = losses.numel()
    keep = n - min(n - 1, round(drop_frac * n))  # at least one sample keeps its weight
    order = torch.argsort(losses.detach(), stable=True)
    weights = torch.zeros_like(losses, dtype=torch.float32)
    weights[order[:keep]] = 1.0 / keep
    return weights


class WeightNet(nn.Module):
    """Linear(1, h) -> ReLU -> Linear(h, 1) -> sigmoid: a weight in (0, 1) per sample loss."""

    def __init__(self, hidden: int = 64, zero_init: bool = True):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        if zero_init:
            # Start flat (every weight 0.5, i.e. uniform after normalisation) so the meta-gradient, not
            # a random init, decides whether high losses are up- or down-weighted. With PyTorch's
            # default init the learned map on SynthVL followed the random initial slope: it saturated
            # increasing in 1 of 3 seeds (noisy captions up-weighted), decreasing in the others.
            out_layer = cast(nn.Linear, self.net[2])
            nn.init.zeros_(out_layer.weight)
            nn.init.zeros_(out_layer.bias)

    def forward(self, loss_per_sample: Tensor) -> Tensor:
        """(N,) losses -> (N,) weights in (0, 1). Callers pass detached losses."""
        # Cast to the net's own dtype (not a fixed float32): a float64 net must accept float64 losses.
        x = loss_per_sample[:, None].to(cast(nn.Linear, self.net[0]).weight.dtype)
        return torch.sigmoid(self.net(x)).squeeze(1)


def normalize_weights(weights: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale (N,) non-negative weights to sum 1 over the *global* batch (all ranks together).

    An all-zero batch falls back to uniform 1/N. With several processes the sum is an all-reduce that
    keeps its gradient, so the normalisation is the one a single process sees on the global batch.
    """
    total = all_reduce_sum(weights.sum())
    count = weights.numel() * world_size()
    uniform = torch.full_like(weights, 1.0 / count)
    return torch.where(total > eps, weights / total.clamp_min(eps), uniform)


def select_virtual_params(module: nn.Module, prefixes: list[str]) -> list[str]:
    """Names of the trainable parameters that take the virtual step: all, or those under ``prefixes``."""
    names = [name for name, p in module.named_parameters() if p.requires_grad]
    if not prefixes:
        return names
    chosen = [n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)]
    unmatched = [p for p in prefixes if not any(n == p or n.startswith(p + ".") for n in names)]
    if unmatched:
        raise ValueError(
            f"meta.virtual_params {unmatched} match no trainable parameter; names look like: "
            f"{', '.join(sorted({n.rsplit('.', 2)[0] for n in names})[:12])}"
        )
    return chosen


@dataclass
class MetaStepResult:
    """What one training step learned about its batch; all tensors detached, shape (N,)."""

    weights: Tensor  # weights used for the real update (normalised if configured)
    loss_per_sample: Tensor
    meta_loss: float | None  # unweighted meta-set loss of the virtual parameters (None: no meta step)


class MetaWeighting:
    """Owns the weighting net, its optimiser and the meta step.

    ``task`` is the module whose parameters the model optimiser updates; ``task(batch)`` must return a
    dict with ``"loss_per_sample"`` of shape (N,).
    """

    def __init__(self, cfg: MetaConfig, task: nn.Module):
        if cfg.interval < 1:
            raise ValueError(f"meta.interval must be >= 1, got {cfg.interval}")
        self.cfg = cfg
        self.wnet = WeightNet(cfg.hidden, zero_init=cfg.zero_init)
        # meta.lr is a rate per *training* step: a net updated every k steps takes k-times larger
        # steps, so it moves as far over a run. Measured on SynthVL (3 seeds): every 2nd step at the
        # unscaled lr learned a flatter map (vague captions weighted 0.16-0.19 instead of 0.06-0.09)
        # and kept 58% of the every-step gain; at the scaled lr the map and the gain (108%) matched.
        lr = cfg.lr * cfg.interval
        if cfg.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                self.wnet.parameters(), lr=lr, weight_decay=cfg.weight_decay
            )
        elif cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.wnet.parameters(), lr=lr, momentum=0.9, weight_decay=cfg.weight_decay)
        else:
            raise ValueError(f"meta.optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")
        if cfg.method not in ("exact", "first_order"):
            raise ValueError(f"meta.method must be 'exact' or 'first_order', got {cfg.method!r}")
        self.virtual_names = select_virtual_params(task, cfg.virtual_params)
        self.skipped_updates = 0  # weighting-net updates skipped for non-finite gradients

    def is_meta_step(self, step: int) -> bool:
        return step % self.cfg.interval == 0

    def weights(self, loss_per_sample: Tensor) -> Tensor:
        """Weights for the real update, without grad: (N,) -> (N,)."""
        with torch.no_grad():
            return self._weights_with_grad(loss_per_sample)

    def _weights_with_grad(self, loss_values: Tensor) -> Tensor:
        raw = self.wnet(loss_values.detach())
        return normalize_weights(raw) if self.cfg.normalize else raw

    def _apply_wnet_grads(self, grads: Sequence[Tensor | None]) -> None:
        """Sum the weighting-net gradients over ranks (each rank holds its share of the global
        objective), then step, unless they are not finite (fp16 overflow): skip like a GradScaler."""
        params = list(self.wnet.parameters())
        dense = [torch.zeros_like(p) if g is None else g.detach() for p, g in zip(params, grads, strict=True)]
        all_reduce_sum_(dense)
        if not all(bool(torch.isfinite(g).all()) for g in dense):
            self.skipped_updates += 1
            return
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(params, dense, strict=True):
            p.grad = g
        self.optimizer.step()

    def _meta_loss(self, task: nn.Module, params: dict[str, Tensor], meta_batch: Mapping[str, Any]) -> Tensor:
        """This rank's share of the mean meta-set loss: its rows' sum over the global meta-batch size."""
        meta_out = functional_call(task, params, (meta_batch,), strict=False)
        losses = meta_out["loss_per_sample"]
        return losses.sum() / (losses.numel() * world_size())

    def meta_update(
        self,
        task: nn.Module,
        loss_per_sample: Tensor,
        meta_batch: Mapping[str, Any],
        partial_losses: Sequence[Tensor] | None = None,
        train_forward: Callable[[dict[str, Tensor]], Tensor] | None = None,
    ) -> float:
        """Stages 1-2 of the meta step (README "Method notes"): virtual step, meta loss, one weighting-net update.

        ``task`` is the unwrapped module (never a DDP wrapper). ``loss_per_sample`` (n,) are this
        rank's training losses. For ``method="exact"`` they must carry the graph to the task's
        parameters (computed under :func:`meta_forward_context`); the caller then reuses them for
        stage 3 instead of a third forward. With gradient accumulation pass detached values plus
        ``partial_losses``: per micro-batch loss vectors, each differentiable only through its own
        micro-batch, whose gradients sum to the full batch's. ``method="first_order"`` needs
        ``train_forward(params) -> (n,)`` losses of the training batch under given parameters.
        Returns the meta loss (global mean).
        """
        if self.cfg.method == "first_order":
            if train_forward is None:
                raise ValueError("meta.method='first_order' needs train_forward")
            return self.first_order_update(task, loss_per_sample, meta_batch, train_forward)
        params = dict(task.named_parameters())
        virtual = [params[name] for name in self.virtual_names]
        weights = self._weights_with_grad(loss_per_sample)
        # create_graph: the virtual parameters must stay a function of the weighting net.
        grads: list[Tensor] | None = None
        for part in partial_losses if partial_losses is not None else [loss_per_sample]:
            # allow_unused: with accumulation a micro-batch's loss may not reach every virtual parameter
            # (the logit scale's gradient is taken in one micro-batch only).
            part_grads = torch.autograd.grad(
                (weights * part).sum(), virtual, create_graph=True, retain_graph=True, allow_unused=True
            )
            g = [torch.zeros_like(p) if gi is None else gi for p, gi in zip(virtual, part_grads, strict=True)]
            grads = g if grads is None else [a + b for a, b in zip(grads, g, strict=True)]
        assert grads is not None
        # Each rank differentiated its share of the global weighted loss: the virtual step takes the
        # sum over ranks, with gradient, so the second-order path crosses ranks too.
        grads = self._sum_over_ranks(grads)
        virtual_params = {
            name: p - self.cfg.virtual_lr * g for name, p, g in zip(self.virtual_names, virtual, grads, strict=True)
        }
        # Parameters outside the virtual subset enter the meta forward as constants, so autograd
        # records nothing for them: restricting the subset really saves time.
        frozen = {name: p.detach() for name, p in params.items() if name not in virtual_params}
        meta_loss = self._meta_loss(task, {**frozen, **virtual_params}, meta_batch)
        wnet_grads = torch.autograd.grad(meta_loss, list(self.wnet.parameters()), allow_unused=True)
        self._apply_wnet_grads(wnet_grads)
        return float(all_reduce_sum(meta_loss.detach()))

    def first_order_update(
        self,
        task: nn.Module,
        loss_per_sample: Tensor,
        meta_batch: Mapping[str, Any],
        train_forward: Callable[[dict[str, Tensor]], Tensor],
    ) -> float:
        """The meta-gradient linearised at the current parameters, without any second-order graph.

        theta_hat = theta - alpha * sum_i w_i grad l_i is linear in the weights, so exactly
        dM/dphi = -alpha * sum_i (dw_i/dphi) * <grad l_i(theta), grad M(theta_hat)>. We evaluate the
        meta gradient u at theta instead of theta_hat (first order in alpha, as Learning-to-Reweight
        does) and measure each alignment <grad l_i, u> with one forward-difference probe of the
        training losses along u: no double backward, no graph of the virtual step. Cost: the meta
        forward/backward plus one no-grad training forward (two, in fp32, under autocast).
        """
        params = dict(task.named_parameters())
        virtual = [params[name] for name in self.virtual_names]
        frozen = {name: p.detach() for name, p in params.items() if name not in self.virtual_names}
        live = {name: p for name, p in zip(self.virtual_names, virtual, strict=True)}
        meta_loss = self._meta_loss(task, {**frozen, **live}, meta_batch)
        u = list(torch.autograd.grad(meta_loss, virtual, allow_unused=True))
        u = [torch.zeros_like(p) if g is None else g for p, g in zip(virtual, u, strict=True)]
        all_reduce_sum_(u)
        norm = torch.sqrt(cast(Tensor, sum((g.double() ** 2).sum() for g in u))).item()
        if norm == 0.0 or not math.isfinite(norm):
            return float(all_reduce_sum(meta_loss.detach()))
        eps = self.cfg.fd_step / norm

        def losses_at(sign: float) -> Tensor:
            probe = {
                name: p.detach() + sign * eps * g for name, p, g in zip(self.virtual_names, virtual, u, strict=True)
            }
            return train_forward({**frozen, **probe}).double()

        device_type = loss_per_sample.device.type
        with torch.no_grad():
            if torch.is_autocast_enabled(device_type):
                # A 1e-2 probe moves the losses by ~1e-3 relative, below bf16/fp16 resolution: probe in
                # fp32, on both sides, rather than against the low-precision training losses.
                with torch.autocast(device_type, enabled=False):
                    alignment = (losses_at(1.0) - losses_at(-1.0)) / (2 * eps)
            else:
                alignment = (losses_at(1.0) - loss_per_sample.detach().double()) / eps  # (n,) ~ <grad l_i, u>
        alignment = alignment.to(loss_per_sample.dtype if loss_per_sample.dtype == torch.float64 else torch.float32)
        weights = self._weights_with_grad(loss_per_sample)
        surrogate = -self.cfg.virtual_lr * (weights * alignment).sum()
        self._apply_wnet_grads(torch.autograd.grad(surrogate, list(self.wnet.parameters()), allow_unused=True))
        return float(all_reduce_sum(meta_loss.detach()))

    @staticmethod
    def _sum_over_ranks(grads: list[Tensor]) -> list[Tensor]:
        if world_size() == 1:
            return grads
        # One message: flatten, sum with gradient, split back.
        flat = all_reduce_sum(torch.cat([g.reshape(-1) for g in grads]))
        out, offset = [], 0
        for g in grads:
            out.append(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()
        return out

    def step(
        self,
        task: nn.Module,
        loss_per_sample: Tensor,
        meta_batch: Mapping[str, Any] | None,
        step: int,
        partial_losses: Sequence[Tensor] | None = None,
        train_forward: Callable[[dict[str, Tensor]], Tensor] | None = None,
    ) -> MetaStepResult:
        """Run the meta update if ``step`` is a meta step, then return the weights for the real update
        (see :meth:`meta_update` for the arguments)."""
        meta_loss = None
        if meta_batch is not None and self.is_meta_step(step):
            meta_loss = self.meta_update(task, loss_per_sample, meta_batch, partial_losses, train_forward)
        return MetaStepResult(self.weights(loss_per_sample), loss_per_sample.detach(), meta_loss)

    def state_dict(self) -> dict[str, Any]:
        return {"wnet": self.wnet.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.wnet.load_state_dict(state["wnet"])
        self.optimizer.load_state_dict(state["optimizer"])


def meta_forward_context(active: bool) -> Any:
    """Attention on the math path while a graph must support double backward.

    The fused CPU attention kernel has no double backward; the math path does.
    """
    return sdpa_kernel([SDPBackend.MATH]) if active else nullcontext()
