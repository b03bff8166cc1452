"""Training samples per second from WebDataset shards (local files and loopback HTTP) vs the folder reader.

Generates a SynthVL training split into a temporary folder, shards it with ``mama shard``'s library
function, and builds the three training clip sets the retrieval task would: the folder one
(``data.decode: stream``, every batch decoded from the files) and shard ones over local paths and over
``http://127.0.0.1`` (``python -m http.server`` semantics, served from a thread; webdataset reads it with
curl). Each one assembles the same epoch of batches (same decoder, frame size and frame count; the shard
runs use a shuffle buffer, the folder its seeded permutation), timed side by side in one run, plus a
read-only pass over the shards (tar members streamed, nothing decoded: what resume's fast-forward costs).

    nice -n 10 python benchmarks/shards.py [--videos 240] [--batch 16] [--frames 8] [--size 32]

Prints samples/s and the ratio to the folder reader.
"""

from __future__ import annotations

import argparse
import functools
import http.server
import tempfile
import threading
import time
from pathlib import Path

import torch

from mama.data.clips import load_clipset
from mama.data.records import read_jsonl
from mama.data.shards import iter_shard_samples, load_shard_clipset, shard_records, write_shards
from mama.data.synthvl import SynthConfig, generate
from mama.tokenizer import WordTokenizer


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(folder: Path) -> tuple[http.server.ThreadingHTTPServer, str]:
    handler = functools.partial(_Quiet, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def _epoch_rate(clips: object, steps: int, batch: int, frames: int) -> float:
    t0 = time.perf_counter()
    for step in range(steps):
        clips.train_batch(step, batch, frames, seed=0)  # type: ignore[attr-defined]
    return steps * batch / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=240)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--size", type=int, default=32, help="frame size S (S x S model input)")
    parser.add_argument("--shard-mb", type=float, default=0.25)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = generate(
            Path(tmp) / "data",
            SynthConfig(seed=0, num_train=args.videos, num_meta=30, num_val=30, num_test=30),
            progress=False,
        )
        records = read_jsonl(root / "train.jsonl")
        manifest = write_shards(records, Path(tmp) / "shards", args.shard_mb, progress=False)
        last = len(manifest["shards"]) - 1
        pattern = f"shard-{{000000..{last:06d}}}.tar"
        server, base = _serve(Path(tmp) / "shards")
        tokenizer = WordTokenizer.build([c.text for r in records for c in r.captions])
        slots = 2 * args.frames
        plan = {"batch_size": args.batch, "world_size": 1, "seed": 0, "shuffle_shards": True, "shuffle_buffer": 64}
        steps = len(records) // args.batch
        info = records[0].video
        print(
            f"{len(records)} SynthVL videos ({info.stat().st_size / 1024:.0f} KiB each, about), "
            f"{last + 1} shards of ~{args.shard_mb} MiB, batch {args.batch}, {args.frames} frames at {args.size} px, "
            f"{steps} steps, 1 torch thread"
        )
        rows = []
        t0 = time.perf_counter()  # the folder reader probes every file at load: counted in its rate
        folder = load_clipset("train", records, tokenizer, args.size, slots, decode="stream", progress=False)
        probe_s = time.perf_counter() - t0
        rate = _epoch_rate(folder, steps, args.batch, args.frames)
        rows.append(("folder (decode: stream)", steps * args.batch / (steps * args.batch / rate + probe_s)))
        for name, urls in (
            ("shards, local files", str(Path(tmp) / "shards" / pattern)),
            ("shards, HTTP loopback", f"{base}/{pattern}"),
        ):
            manifest, shard_urls, shard_recs = shard_records(urls)
            clips = load_shard_clipset(shard_recs, shard_urls, manifest, tokenizer, args.size, slots, plan)
            rows.append((name, _epoch_rate(clips, steps, args.batch, args.frames)))
        for name, urls in (
            ("read only, local", str(Path(tmp) / "shards" / pattern)),
            ("read only, HTTP", f"{base}/{pattern}"),
        ):
            t0 = time.perf_counter()
            count = sum(1 for _ in iter_shard_samples(urls))
            rows.append((name, count / (time.perf_counter() - t0)))
        server.shutdown()
    reference = rows[0][1]
    print(f"{'reader':<26}{'samples/s':>12}{'ratio':>9}")
    for name, rate in rows:
        print(f"{name:<26}{rate:>12.1f}{rate / reference:>9.2f}")


if __name__ == "__main__":
    main()
