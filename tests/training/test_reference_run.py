"""The training engine reproduces a pinned run bit for bit.

A 150-step run of the demo's MAMA recipe (configs/synthvl_mama.yaml: angular margin loss plus the exact
meta step every 2nd step) on the tiny SynthVL, one thread. The digest covers every tensor of its final
checkpoint: the task module, the weighting net, and both optimisers' states. It was recorded with the
engine as it stood before the single-Trainer refactor (the retrieval loop in one function), so any
change of the engine that moves a single bit of a retrieval run fails here.

Bitwise results depend on the CPU's kernels: the digest is recorded for one CPU capability (as reported
by ``torch.backends.cpu.get_cpu_capability()``) and torch version; elsewhere the test is skipped, saying why.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch

from mama.checkpoint import load_checkpoint
from mama.config import load_config
from mama.tasks import train

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "synthvl_mama.yaml"
PINNED = {
    "torch": "2.13.0",
    "cpu_capability": "AVX2",
    "digest": "98dcbda5eeb919bef9c50b93c2fa0074d1544d8e8d9d428d8fcb83fb980b5195",
    "num_entries": 403,  # tensors and plain values in the final state
    "t2v_r1": 23.333333333333332,
    "v2t_r1": 36.666666666666664,
    "tail_t2v_r1": 35.0,
}


def flatten(value: Any, path: str, out: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts / lists of tensors and plain values -> {"/a/b/0": leaf}, keys in sorted order."""
    if isinstance(value, torch.Tensor):
        out[path] = value
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            flatten(value[key], f"{path}/{key}", out)
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            flatten(item, f"{path}/{i}", out)
    else:
        out[path] = value
    return out


def digest(flat: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for key, leaf in flat.items():
        h.update(key.encode())
        if isinstance(leaf, torch.Tensor):
            h.update(leaf.reshape(-1).contiguous().view(torch.uint8).numpy().tobytes())
        else:
            h.update(repr(leaf).encode())
    return h.hexdigest()


@pytest.mark.slow
def test_mama_recipe_run_is_bitwise_the_pinned_reference(tiny_synthvl: Path, tmp_path: Path) -> None:
    here = {"torch": torch.__version__.split("+")[0], "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if any(here[k] != PINNED[k] for k in here):
        pytest.skip(f"the digest was recorded with { ({k: PINNED[k] for k in here}) }; this machine has {here}")
    threads = torch.get_num_threads()
    overrides = [
        f"data.root={tiny_synthvl}", "data.synthvl=false", "train.steps=150", "train.threads=1", "train.progress=false",
        "train.batch_size=32", "meta.batch_size=16", "train.device=cpu", f"train.out_dir={tmp_path / 'run'}",
        "train.log_weights_every=0",
    ]  # fmt: skip
    try:
        result = train(load_config(RECIPE, overrides))
    finally:
        torch.set_num_threads(threads)
    ckpt = load_checkpoint(tmp_path / "run" / "checkpoints")
    state = {
        "tensors": ckpt.tensors,
        "optimizer": ckpt.state["optimizer"],
        "meta_optimizer": ckpt.state["meta_optimizer"],
    }
    flat = flatten(state, "", {})
    assert len(flat) == PINNED["num_entries"]
    assert {k: result.metrics[k] for k in ("t2v_r1", "v2t_r1", "tail_t2v_r1")} == {
        k: PINNED[k] for k in ("t2v_r1", "v2t_r1", "tail_t2v_r1")
    }
    assert digest(flat) == PINNED["digest"]
