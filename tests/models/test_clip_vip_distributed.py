"""2 gloo processes compute what 1 process computes through ``clip_vip`` (issue 17): the gradient of the
gathered contrastive loss and the exact and first-order meta steps, in float64, with the virtual step over
every parameter (so the second-order graph crosses the proxy-guided attention, the adapters and the
all-gathers) and gradient checkpointing on. The comparison itself is tests/test_distributed.py's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mama.config import LossConfig, MetaConfig, ModelConfig
from mama.models import create_model, create_tokenizer, get_spec
from mama.tasks.retrieval.module import RetrievalModule
from mama.weighting import MetaWeighting
from test_distributed import GLOBAL_BATCH, WORDS, _torchrun, compute_case

pytestmark = pytest.mark.distributed


def build_case(
    clip_folder: Path,
) -> tuple[RetrievalModule, MetaConfig, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """A float64 clip_vip task (proxies, temporal embedding, adapters moved off their zero init), a meta
    config over all parameters, and fixed train and meta batches."""
    cfg = ModelConfig(name="clip_vip", pretrained=str(clip_folder), frame_size=32, max_frames=4, max_text_length=12,
                      add_cls_num=2, temporal_size=4, adapters=True, adapter_dim=8, grad_checkpointing=True)  # fmt: skip
    tokenizer = create_tokenizer(cfg, [])
    torch.manual_seed(0)
    model = create_model(cfg, tokenizer)
    get_spec("clip_vip").load_weights(model, cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("temporal_embedding", "up_proj.weight", "up_proj.bias")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    task = RetrievalModule(model, LossConfig(margin=0.05)).double()

    def batch(n: int) -> dict[str, torch.Tensor]:
        picks = torch.randint(len(WORDS), (n, 5), generator=g)
        ids, mask = tokenizer([" ".join(WORDS[i] for i in row) for row in picks.tolist()])
        video = torch.randn(n, 3, 3, 32, 32, generator=g, dtype=torch.float64)  # (B, T, C, H, W)
        return {"video": video, "input_ids": ids, "attention_mask": mask}

    meta_cfg = MetaConfig(
        interval=1, enabled=True, hidden=8, zero_init=False, optimizer="sgd", lr=0.5, virtual_lr=0.5, virtual_params=[]
    )
    return task, meta_cfg, batch(GLOBAL_BATCH), batch(6)


def test_two_processes_equal_one_through_clip_vip(tiny_clip_dir: Path, tmp_path: Path) -> None:
    worker = Path(__file__).with_name("clip_vip_distributed_worker.py")
    _torchrun([str(worker), str(tmp_path / "ranks.pt"), str(tiny_clip_dir)], tmp_path)
    got = torch.load(tmp_path / "ranks.pt")
    ref = compute_case(*build_case(tiny_clip_dir), world=1)
    assert set(got) == set(ref) and any(k.startswith("grad.model.clip.vision_model.embeddings.added_cls") for k in ref)
    for key, value in ref.items():
        # float64 throughout: only summation order differs between 1 and 2 processes.
        torch.testing.assert_close(got[key], value, rtol=1e-9, atol=1e-11, msg=lambda m, k=key: f"{k}: {m}")
    # The exact meta step really moved the weighting net (the comparison is not between two no-ops).
    task, meta_cfg, _, _ = build_case(tiny_clip_dir)
    torch.manual_seed(1)
    fresh = MetaWeighting(meta_cfg, task).wnet.double()
    moved = max((ref[f"exact.wnet.{n}"] - p).abs().max().item() for n, p in fresh.named_parameters())
    assert moved > 1e-4
