"""Step-time cost of the meta-weighted (MAMA) step relative to a plain contrastive step.

Same model, same batch, same process; each variant runs ``--repeats`` steps after ``--warmup`` steps,
and the median step time is reported together with its ratio to the plain step:

    python benchmarks/meta_overhead.py [--batch-size 64] [--repeats 30] [key=value model overrides]

Variants: plain (InfoNCE-style step, uniform weights), MAMA with the virtual step over all parameters,
MAMA with the virtual step restricted to the projection heads, and the all-parameter step with a meta
update every 4 steps (amortised). Run it alone: a second busy process on 2 cores distorts timings.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from mama.config import load_config
from mama.models import create_model
from mama.task import RetrievalTask
from mama.tokenizer import WordTokenizer
from mama.weighting import MetaWeighting, meta_forward_context

WORDS = "a the small large red green blue yellow circle square triangle moves left right up down on background".split()


def make_batch(cfg, tokenizer: WordTokenizer, batch_size: int, generator: torch.Generator) -> dict:
    video = torch.randn(batch_size, cfg.data.num_frames, 3, cfg.data.frame_size, cfg.data.frame_size, generator=generator)
    picks = torch.randint(len(WORDS), (batch_size, 10), generator=generator)
    ids, mask = tokenizer([" ".join(WORDS[i] for i in row) for row in picks.tolist()])
    return {"video": video, "input_ids": ids, "attention_mask": mask}


def time_steps(step_fn: Callable[[int], None], warmup: int, repeats: int) -> list[float]:
    """Wall times (ms) of ``repeats`` steps after ``warmup`` untimed ones (timed steps start at 1000,
    a multiple of any meta interval used here, so they cover whole periods)."""
    for i in range(warmup):
        step_fn(i)
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        step_fn(1000 + i)
        times.append(1000 * (time.perf_counter() - t0))
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    cfg = load_config(None, args.overrides)
    tokenizer = WordTokenizer.build(WORDS, max_length=cfg.model.max_text_length)
    g = torch.Generator().manual_seed(0)
    train_batch = make_batch(cfg, tokenizer, args.batch_size, g)
    meta_batch = make_batch(cfg, tokenizer, cfg.meta.batch_size, g)

    def runner(meta_prefixes: list[str] | None, interval: int = 1) -> Callable[[int], None]:
        torch.manual_seed(0)
        task = RetrievalTask(create_model(cfg.model, tokenizer), cfg.loss)
        optimizer = torch.optim.AdamW(task.parameters(), lr=1e-4)
        meta = None
        if meta_prefixes is not None:
            meta_cfg = type(cfg.meta)(**{**vars(cfg.meta), "enabled": True, "virtual_params": meta_prefixes, "interval": interval})
            meta = MetaWeighting(meta_cfg, task)

        def step(i: int) -> None:
            meta_now = meta is not None and meta.is_meta_step(i)
            with meta_forward_context(meta_now):
                losses = task(train_batch)["loss_per_sample"]
                if meta is None:
                    weights = torch.full_like(losses, 1.0 / len(losses))
                else:
                    weights = meta.step(task, losses, meta_batch if meta_now else None, i).weights
            optimizer.zero_grad(set_to_none=True)
            (weights * losses).sum().backward()
            optimizer.step()

        return step

    variants = {
        "plain": runner(None),
        "mama (virtual step: all params)": runner([]),
        "mama (virtual step: heads only)": runner(["model.video.head", "model.text.head", "logit_scale"]),
        "mama (all params, meta every 4)": runner([], interval=4),
    }
    repeats = max(4, args.repeats - args.repeats % 4)  # whole meta periods for the interval variant
    print(
        f"batch {args.batch_size}, meta batch {cfg.meta.batch_size}, {torch.get_num_threads()} threads; "
        f"median (mean for the interval variant) of {repeats} steps after {args.warmup} warm-up steps"
    )
    results = {}
    for name, step in variants.items():
        times = time_steps(step, args.warmup, repeats)
        # With a meta interval the median would hide the 1-in-k expensive step: use the mean there.
        results[name] = statistics.fmean(times) if "every" in name else statistics.median(times)
    plain = results["plain"]
    for name, ms in results.items():
        print(f"{name:<36} {ms:8.1f} ms/step   x{ms / plain:.2f} of plain")


if __name__ == "__main__":
    main()
