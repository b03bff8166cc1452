"""One place that decides numeric precision: an autocast context that is a no-op where unsupported."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, precision: str) -> Any:
    """Autocast for ``precision`` in {"fp32", "bf16", "fp16"}; fp32, and fp16 on CPU, run in float32."""
    if precision not in _DTYPES:
        raise ValueError(f"precision must be one of {sorted(_DTYPES)}, got {precision!r}")
    device_type = torch.device(device).type
    dtype = _DTYPES[precision]
    if dtype is None or (dtype is torch.float16 and device_type == "cpu"):
        return nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def grad_scaler(device: torch.device | str, precision: str) -> torch.amp.GradScaler:
    """A GradScaler that is enabled only for fp16 on CUDA (elsewhere its calls pass through)."""
    device_type = torch.device(device).type
    return torch.amp.GradScaler(device_type, enabled=precision == "fp16" and device_type == "cuda")
