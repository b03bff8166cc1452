"""Meta-learned sample weighting (Meta-Weight-Net style), method.md section 2.

A tiny MLP maps each sample's loss to a weight in (0, 1). It learns by bilevel optimisation: a virtual
SGD step of the model on the weighted training loss, then the *unweighted* loss of those virtual
parameters on a clean meta batch, differentiated back into the weighting net through the virtual step
(second order). The virtual step is functional (``torch.func.functional_call``): parameters are never
assigned, so the real model is untouched until the real optimiser step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from mama.config import MetaConfig


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
            nn.init.zeros_(self.net[2].weight)
            nn.init.zeros_(self.net[2].bias)

    def forward(self, loss_per_sample: Tensor) -> Tensor:
        """(N,) losses -> (N,) weights in (0, 1). Callers pass detached losses."""
        # Cast to the net's own dtype (not a fixed float32): a float64 net must accept float64 losses.
        x = loss_per_sample[:, None].to(self.net[0].weight.dtype)
        return torch.sigmoid(self.net(x)).squeeze(1)


def normalize_weights(weights: Tensor, eps: float = 1e-12) -> Tensor:
    """Scale (N,) non-negative weights to sum 1; an all-zero batch falls back to uniform 1/N."""
    total = weights.sum()
    uniform = torch.full_like(weights, 1.0 / weights.numel())
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


LossFn = Callable[[Mapping[str, Any]], Tensor]


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
        if cfg.optimizer == "adam":
            self.optimizer: torch.optim.Optimizer = torch.optim.Adam(
                self.wnet.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay
            )
        elif cfg.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(
                self.wnet.parameters(), lr=cfg.lr, momentum=0.9, weight_decay=cfg.weight_decay
            )
        else:
            raise ValueError(f"meta.optimizer must be 'adam' or 'sgd', got {cfg.optimizer!r}")
        self.virtual_names = select_virtual_params(task, cfg.virtual_params)

    def is_meta_step(self, step: int) -> bool:
        return step % self.cfg.interval == 0

    def weights(self, loss_per_sample: Tensor) -> Tensor:
        """Weights for the real update, without grad: (N,) -> (N,)."""
        with torch.no_grad():
            raw = self.wnet(loss_per_sample.detach())
            return normalize_weights(raw) if self.cfg.normalize else raw

    def meta_update(self, task: nn.Module, loss_per_sample: Tensor, meta_batch: Mapping[str, Any]) -> float:
        """Stages 1-2: virtual step on the training losses, meta loss, one weighting-net update.

        ``loss_per_sample`` must come from ``task(train_batch)`` with the graph to the task's
        parameters intact (computed under :func:`meta_forward_context`). Because the model's
        parameters do not change before the real update, the caller reuses these same losses for stage
        3 instead of a third forward: the result is identical and one forward cheaper.
        Returns the meta loss.
        """
        params = dict(task.named_parameters())
        virtual = [params[name] for name in self.virtual_names]
        raw = self.wnet(loss_per_sample.detach())
        weights = normalize_weights(raw) if self.cfg.normalize else raw
        weighted = (weights * loss_per_sample).sum()
        # create_graph: the virtual parameters must stay a function of the weighting net.
        grads = torch.autograd.grad(weighted, virtual, create_graph=True, retain_graph=True)
        virtual_params = {
            name: p - self.cfg.virtual_lr * g for name, p, g in zip(self.virtual_names, virtual, grads, strict=True)
        }
        # Parameters outside the virtual subset enter the meta forward as constants, so autograd
        # records nothing for them: restricting the subset really saves time.
        frozen = {name: p.detach() for name, p in params.items() if name not in virtual_params}
        meta_out = functional_call(task, {**frozen, **virtual_params}, (meta_batch,), strict=False)
        meta_loss = meta_out["loss_per_sample"].mean()
        wnet_params = list(self.wnet.parameters())
        wnet_grads = torch.autograd.grad(meta_loss, wnet_params, allow_unused=True)
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in zip(wnet_params, wnet_grads, strict=True):
            p.grad = torch.zeros_like(p) if g is None else g
        self.optimizer.step()
        return float(meta_loss.detach())

    def step(
        self, task: nn.Module, loss_per_sample: Tensor, meta_batch: Mapping[str, Any] | None, step: int
    ) -> MetaStepResult:
        """Run the meta update if ``step`` is a meta step, then return the weights for the real update."""
        meta_loss = None
        if meta_batch is not None and self.is_meta_step(step):
            meta_loss = self.meta_update(task, loss_per_sample, meta_batch)
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
