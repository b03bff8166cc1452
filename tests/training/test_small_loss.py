"""The small-loss trick (``loss.drop_frac``): the baseline a learned, loss-decreasing weight map is
compared with. Each step drops the highest-loss fraction of the batch and weights the rest equally."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from mama.config import ConfigError, load_config
from mama.tasks import train
from mama.weighting import small_loss_weights

Overrides = Callable[[str | Path, str | Path], list[str]]


def test_weights_drop_exactly_the_highest_fraction() -> None:
    losses = torch.tensor([0.5, 3.0, 1.0, 2.0, 0.1, 4.0, 0.2, 0.3])
    weights = small_loss_weights(losses, 0.25)
    assert torch.allclose(weights, torch.tensor([1 / 6 if v < 3.0 else 0.0 for v in losses.tolist()]))
    assert torch.isclose(weights.sum(), torch.tensor(1.0))
    assert torch.equal(small_loss_weights(losses, 0.0), torch.full((8,), 1 / 8))
    # Ties at the threshold: exactly round(q * n) samples are dropped, whatever the values.
    assert int((small_loss_weights(torch.ones(10), 0.3) == 0).sum()) == 3
    # Never every sample.
    assert int((small_loss_weights(losses, 0.99) > 0).sum()) == 1


def test_training_drops_the_highest_losses_of_every_batch(
    tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path
) -> None:
    run = tmp_path / "small_loss"
    cfg = load_config(None, [*tiny_overrides(tiny_synthvl, run), "loss.drop_frac=0.25", "train.log_weights_every=1"])
    train(cfg)
    records = [json.loads(line) for line in (run / "weights.jsonl").read_text().splitlines()]
    assert len(records) == cfg.train.steps
    for record in records:
        losses, weights = torch.tensor(record["loss"]), torch.tensor(record["weight"])
        dropped = weights == 0
        assert int(dropped.sum()) == round(0.25 * len(losses))
        assert losses[dropped].min() >= losses[~dropped].max()
    plain = load_config(None, [*tiny_overrides(tiny_synthvl, tmp_path / "plain"), "train.log_weights_every=1"])
    train(plain)
    first = json.loads((tmp_path / "plain" / "weights.jsonl").read_text().splitlines()[0])
    assert len(set(first["weight"])) == 1  # uniform without the trick
    assert json.loads((run / "metrics.json").read_text()) != json.loads(
        (tmp_path / "plain" / "metrics.json").read_text()
    )


def test_small_loss_and_meta_weighting_are_exclusive(
    tiny_synthvl: Path, tiny_overrides: Overrides, tmp_path: Path
) -> None:
    with pytest.raises(ConfigError, match="drop_frac"):
        load_config(None, [*tiny_overrides(tiny_synthvl, tmp_path), "loss.drop_frac=0.2", "meta.enabled=true"])
