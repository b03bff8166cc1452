"""Transformer layers shared by the models: the from-scratch towers, CLIP's temporal aggregation and the
QA fusion transformer all use the same pre-LN block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint


class Block(nn.Module):
    """Pre-LN transformer block; attention through ``scaled_dot_product_attention``."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_ratio * width), nn.GELU(), nn.Linear(mlp_ratio * width, width))

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        """x: (B, L, W); key_padding_mask: (B, L) bool, True for real tokens."""
        b, length, width = x.shape
        qkv = self.qkv(self.norm1(x))
        # (B, L, 3W) -> 3 x (B, heads, L, W / heads)
        q, k, v = qkv.view(b, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if key_padding_mask is None else key_padding_mask[:, None, None, :]
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        # (B, heads, L, W / heads) -> (B, L, W)
        x = x + self.proj(attn.transpose(1, 2).reshape(b, length, width))
        return x + self.mlp(self.norm2(x))


def holds_computed_parameters(module: nn.Module) -> bool:
    """Whether ``module`` currently runs on parameters that are results of a computation: the meta step's
    virtual parameters (``theta - alpha * grad``), which ``torch.func.functional_call`` puts in place for
    one forward only. Gradient checkpointing must not recompute such a module: the recomputation runs in
    backward, after ``functional_call`` has put the module's own parameters back, and would silently use
    them instead of the virtual ones."""
    return any(p.grad_fn is not None for p in module.parameters())


def run_blocks(blocks: nn.ModuleList, x: Tensor, key_padding_mask: Tensor | None, recompute: bool) -> Tensor:
    """Apply ``blocks`` in order; with ``recompute`` (gradient checkpointing) activations inside each
    block are not stored but recomputed in backward. Non-reentrant, so double backward still works. A
    block on the meta step's virtual parameters is never recomputed (see :func:`holds_computed_parameters`)."""
    for block in blocks:
        if recompute and torch.is_grad_enabled() and not holds_computed_parameters(block):
            x = checkpoint(block, x, key_padding_mask, use_reentrant=False)
        else:
            x = block(x, key_padding_mask)
    return x
