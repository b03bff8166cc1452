"""What the *Runs* tab of ``mama serve`` shows about a training run folder.

A run folder (``mama train``, see :mod:`mama.training.trainer`) holds::

    log.jsonl        one record per logged step: "loss", "lr", ... and, with meta weighting,
                     "meta_loss", "weight_by_noise" {kind: mean weight}, "weight_by_source" {source: ...};
                     evaluation records carry "split"
    weights.jsonl    per-sample "loss", "weight", "noise", "source" of every k-th batch (log_weights_every)
    metrics.json     the final evaluation; a demo folder holds results.json instead
    checkpoints/     the weighting net ("wnet") of a MAMA run, read by :func:`mama.tasks.load_run`

Figures are :class:`matplotlib.figure.Figure` objects built without pyplot, so the server's threads
never share pyplot's global state.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mama.training.loggers import read_log

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["RunView", "find_runs", "view_run"]

# Runs are found this many folders below the runs root at most (runs/<group>/<variant>/<seed> is 3);
# a deeper search of a big runs folder would stall the page.
MAX_DEPTH = 4
# The loss -> weight map is drawn from 0 to a little past the largest logged loss of these late batches.
LATE_BATCHES = 10


@dataclass
class RunView:
    """One run, ready to show: figures (None when the run has nothing to draw) and the final metrics."""

    name: str
    loss: Figure | None
    weight_curve: Figure | None
    weights_by_kind: Figure | None
    metrics: list[list[Any]]  # rows of [metric, value]
    notes: list[str] = field(default_factory=list)  # why a figure is missing


def find_runs(root: Path) -> list[str]:
    """Run folders under ``root`` (those holding a ``log.jsonl``), as sorted POSIX paths relative to it."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    frontier = [root]
    for _ in range(MAX_DEPTH + 1):
        below = []
        for folder in frontier:
            if (folder / "log.jsonl").is_file():
                found.append(folder.relative_to(root).as_posix())
            try:
                below += [c for c in folder.iterdir() if c.is_dir() and c.name not in ("checkpoints", "tokenizer")]
            except OSError:  # unreadable folder: skip it, the rest is still worth listing
                continue
        frontier = below
    return sorted(found)


def _figure(title: str) -> tuple[Figure, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.5, 3.4), dpi=100, layout="tight")
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    return fig, ax


def loss_figure(log: list[dict[str, Any]]) -> Figure | None:
    """Training loss (and the meta loss of a MAMA run) against the step."""
    train = [r for r in log if "split" not in r and isinstance(r.get("loss"), (int, float))]
    if not train:
        return None
    fig, ax = _figure("Training loss")
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss (weighted)")
    meta = [r for r in train if isinstance(r.get("meta_loss"), (int, float))]
    if meta:
        ax.plot([r["step"] for r in meta], [r["meta_loss"] for r in meta], label="meta loss (clean meta batch)")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    return fig


def weights_by_kind_figure(log: list[dict[str, Any]]) -> Figure | None:
    """Mean weight of each caption kind (noise kind and source) at every logged step."""
    series: dict[str, list[tuple[int, float]]] = {}
    for record in log:
        for group, prefix in (("weight_by_noise", "noise"), ("weight_by_source", "source")):
            for kind, value in (record.get(group) or {}).items():
                if isinstance(value, (int, float)):
                    series.setdefault(f"{prefix}: {'clean' if kind == 'none' else kind}", []).append(
                        (record["step"], value)
                    )
    if not series:
        return None
    fig, ax = _figure("Mean weight per caption kind")
    for label, points in sorted(series.items()):
        ax.plot([s for s, _ in points], [w for _, w in points], label=label, linestyle="-" if "noise" in label else ":")
    ax.set_xlabel("step")
    ax.set_ylabel("mean weight (1 = uniform)")
    ax.legend(fontsize=7)
    return fig


def weight_curve_figure(run_dir: Path) -> Figure | None:
    """The learned loss -> weight map of a MAMA run (its weighting net from the newest checkpoint), with
    the mean late-training loss of each caption noise kind marked; None for a run without one."""
    from mama.tasks import weight_curve

    curve = weight_curve(run_dir, late_batches=LATE_BATCHES)
    if curve is None:
        return None
    fig, ax = _figure("Learned loss-to-weight map")
    ax.plot(curve.loss.numpy(), curve.weight.numpy(), label="weighting net")
    for (noise, values), dash in zip(curve.late_loss_by_noise.items(), ("--", ":", "-.", (0, (1, 3))), strict=False):
        label = "clean" if noise == "none" else noise
        ax.axvline(statistics.fmean(values), color="0.4", linestyle=dash, linewidth=1, label=f"late loss, {label}")
    ax.set_xlabel("per-sample loss")
    ax.set_ylabel("weight (before normalisation)")
    ax.legend(fontsize=7)
    return fig


def _flatten(prefix: str, value: Any, rows: list[list[Any]]) -> None:
    """Append [dotted name, value] rows for every leaf of ``value`` to ``rows``."""
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), inner, rows)
    elif isinstance(value, float):
        rows.append([prefix, round(value, 4) if math.isfinite(value) else str(value)])
    elif isinstance(value, (int, str, bool)) or value is None:
        rows.append([prefix, value])
    else:  # lists (e.g. per-seed values): shown as JSON, not expanded into hundreds of rows
        rows.append([prefix, json.dumps(value)[:200]])


def final_metrics(run_dir: Path) -> list[list[Any]]:
    """Rows of [name, value] from ``metrics.json`` (or a demo's ``results.json``); nested values flattened."""
    for name in ("metrics.json", "results.json"):
        path = run_dir / name
        if path.is_file():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                return [[name, f"unreadable: {exc}"]]
            rows: list[list[Any]] = []
            _flatten("", data, rows)
            return rows
    return []


def view_run(runs_root: Path, name: str) -> RunView:
    """Figures and metrics of the run ``name`` (a path relative to ``runs_root``, one of :func:`find_runs`).

    Raises:
        ValueError: ``name`` is not a run folder under ``runs_root`` (the browser may send anything).
    """
    # Only a name find_runs lists is opened (never "..", an absolute path or a folder without a log);
    # a run linked into the runs folder by its owner is listed, and opened where the link points.
    if not name or name not in find_runs(Path(runs_root)):
        raise ValueError(f"{name!r} is not a run folder under {runs_root}")
    run_dir = Path(runs_root) / name
    log = read_log(run_dir / "log.jsonl")
    notes = []
    loss = loss_figure(log)
    if loss is None:
        notes.append("log.jsonl holds no training loss yet")
    by_kind = weights_by_kind_figure(log)
    if by_kind is None:
        notes.append("no per-kind weights logged (not a meta-weighted run)")
    try:
        curve = weight_curve_figure(run_dir)
        if curve is None:
            notes.append("no weighting net in the checkpoint (not a MAMA run)")
    except Exception as exc:  # no checkpoint yet, or an unreadable one: the other figures still help
        curve = None
        notes.append(f"weighting net not loaded: {exc}")
    metrics = final_metrics(run_dir)
    if not metrics:
        notes.append("no metrics.json yet (the run has not finished)")
    return RunView(name, loss, curve, by_kind, metrics, notes)
