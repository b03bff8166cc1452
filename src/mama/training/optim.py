"""Optimisers and learning-rate schedules of the training engine."""

from __future__ import annotations

import math

import torch
from torch import nn

from mama.config import OptimConfig, Schedule


def lr_lambda(step: int, total: int, warmup_frac: float, schedule: Schedule) -> float:
    """Learning-rate multiplier: linear warm-up, then cosine to 0 (or constant)."""
    warmup = max(1, round(warmup_frac * total)) if warmup_frac > 0 else 0
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_optimizer(
    cfg: OptimConfig, module: nn.Module, total_steps: int, backbone_prefixes: tuple[str, ...] = ()
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW with weight decay on matrices only, parameters under ``backbone_prefixes`` (names relative to
    ``module``) at ``cfg.backbone_lr``, and the warm-up + cosine schedule applied to every group."""
    backbone_lr = cfg.lr if cfg.backbone_lr is None else cfg.backbone_lr
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        # No weight decay on gains, biases, embeddings' positions or the logit scale (CLIP practice).
        no_decay = p.ndim < 2 or "pos" in name.split(".")[-1] or "cls" in name
        is_backbone = name.startswith(backbone_prefixes) if backbone_prefixes else False
        groups.setdefault((is_backbone, no_decay), []).append(p)
    optimizer = torch.optim.AdamW(
        [
            {
                "params": params,
                "weight_decay": 0.0 if no_decay else cfg.weight_decay,
                "lr": backbone_lr if is_backbone else cfg.lr,
            }
            for (is_backbone, no_decay), params in sorted(groups.items())
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, total_steps, cfg.warmup_frac, cfg.schedule)
    )
    return optimizer, scheduler
