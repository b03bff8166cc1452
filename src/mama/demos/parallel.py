"""Train several demo runs at once, each in its own forked process with one torch thread.

On a small CPU a tiny model does not get faster with a second thread (SynthVL fine-tuning: 257 ms per
step with one thread, 255 with two, on 2 cores), while two one-thread runs side by side take 276 and 279
ms per step: running the demo's variants two at a time nearly halves its wall time. One thread per run
also makes every number independent of how many runs share the machine and of its core count.

The data is decoded once in the parent; forked children inherit it (copy-on-write) instead of decoding
it again. A child that fails or dies stops the whole batch with its run folder and error; the other
children are terminated, never left running.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from mama.config import Config
from mama.tasks import train
from mama.training.trainer import TrainResult

__all__ = ["train_runs"]

_INHERITED: dict[str, Any] = {}  # what forked children read instead of receiving it pickled


def _child(cfg: Config, conn: Connection) -> None:
    try:
        conn.send(("ok", train(cfg, data=_INHERITED["data"])))
    except BaseException as exc:  # reported to the parent, which raises it with the run's folder
        conn.send(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def _steps_logged(run_dir: Path, since: float) -> int:
    """The last training step written to a run's log.jsonl (0 before the first log line, and for a log
    last written before ``since``: an earlier run's, not yet replaced)."""
    path = run_dir / "log.jsonl"
    try:
        if path.stat().st_mtime < since:
            return 0
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0
    last = 0
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # a line being written
            continue
        if isinstance(record, dict) and "loss" in record:
            last = max(last, int(record.get("step", 0)))
    return last


def train_runs(
    cfgs: Sequence[Config],
    data: Any,
    jobs: int,
    progress: bool = True,
    cost: Callable[[Config], float] | None = None,
    on_done: Callable[[Config, TrainResult], str] | None = None,
) -> list[TrainResult]:
    """``train(cfg, data=data)`` for every config, ``jobs`` at a time; results in the order of ``cfgs``.

    ``jobs <= 1`` (or no ``fork`` on this platform) trains them one after the other in this process.
    Otherwise each run trains in a forked child with its own progress bar off, and one bar here counts
    the steps of all runs (from their log files). ``cost`` orders the runs longest first, so the last
    one to start is a short one. ``on_done(cfg, result)`` returns a line to print when a run ends.
    """
    if jobs <= 1 or "fork" not in mp.get_all_start_methods():
        results = []
        for cfg in cfgs:
            results.append(train(cfg, data=data))
            if on_done is not None and progress:
                print(on_done(cfg, results[-1]), flush=True)
        return results
    # torch.optim imports torch._dynamo when it builds its first optimizer: 1-8 s (the longer when the
    # modules are not byte-compiled yet), paid by every child. Imported here once, the children inherit it.
    import torch._dynamo  # noqa: F401

    ctx = mp.get_context("fork")
    order = sorted(range(len(cfgs)), key=lambda i: -(cost(cfgs[i]) if cost else 0.0))
    running: dict[int, tuple[Any, Connection, float]] = {}
    results_by_index: dict[int, TrainResult] = {}
    finished_steps = 0
    total = sum(c.train.steps for c in cfgs)
    bar = tqdm(total=total, desc=f"{len(cfgs)} runs, {jobs} at a time", unit="step", disable=not progress)
    _INHERITED["data"] = data
    try:
        while order or running:
            while order and len(running) < jobs:
                i = order.pop(0)
                receiver, sender = ctx.Pipe(duplex=False)
                process = ctx.Process(target=_child, args=(cfgs[i], sender), name=f"mama-run-{i}")
                started = time.time()
                process.start()
                sender.close()  # the child holds the only write end: its exit makes recv() raise EOFError
                running[i] = (process, receiver, started)
            ready = wait([receiver for _, receiver, _ in running.values()], timeout=1.0)
            for i, (process, receiver, _) in list(running.items()):
                if receiver not in ready:
                    continue
                try:
                    status, payload = receiver.recv()
                except EOFError:
                    status, payload = "error", "the training process died without a result"
                process.join()
                del running[i]
                if status != "ok":
                    raise RuntimeError(f"{cfgs[i].train.out_dir}: {payload} (exit code {process.exitcode})")
                results_by_index[i] = payload
                finished_steps += cfgs[i].train.steps
                if on_done is not None:
                    bar.write(on_done(cfgs[i], payload))
            current = finished_steps + sum(
                _steps_logged(Path(cfgs[i].train.out_dir), t) for i, (_, _, t) in running.items()
            )
            bar.update(max(0, min(current, total) - bar.n))
    finally:
        for process, receiver, _ in running.values():
            process.terminate()
            process.join()
            receiver.close()
        bar.close()
        _INHERITED.clear()
    return [results_by_index[i] for i in range(len(cfgs))]
