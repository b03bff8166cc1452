"""A small, clean, balanced meta set held out of a real training split.

Real benchmarks ship no meta split. The paper asks for a small amount of unbiased meta-data; we take
human-written pairs balanced over caption-topic clusters: we embed each video's human captions as a hashed, idf-weighted bag of words, cluster them with
spherical k-means, and take the same number of videos from every cluster (round-robin in a seeded
random order). Everything is a pure function of the records and the seed, so every process (and every
resume) holds out the same videos.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch
from torch import Tensor

from mama.data.records import VideoRecord

__all__ = ["caption_features", "hold_out_balanced"]

_WORD = re.compile(r"[a-z0-9]+")
# Words that say nothing about a topic; without this the clusters follow sentence templates.
_STOPWORDS = frozenset(
    [
        "a",
        "an",
        "the",
        "is",
        "are",
        "was",
        "were",
        "be",
        "been",
        "being",
        "of",
        "in",
        "on",
        "at",
        "to",
        "for",
        "with",
        "and",
        "or",
        "but",
        "by",
        "from",
        "as",
        "it",
        "its",
        "this",
        "that",
        "there",
        "here",
        "his",
        "her",
        "their",
        "they",
        "he",
        "she",
        "we",
        "you",
        "i",
        "someone",
        "something",
        "video",
        "clip",
        "shows",
        "showing",
    ]
)


def _bucket(word: str, dim: int) -> int:
    # Python's hash() is salted per process; ranks and resumes must agree, so hash explicitly.
    return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") % dim


def caption_features(records: list[VideoRecord], dim: int = 2048) -> Tensor:
    """(V, dim) float32 L2-normalised tf-idf vectors of each video's human captions (hashed words)."""
    counts = torch.zeros(len(records), dim)
    for row, record in enumerate(records):
        for caption in record.captions:
            if caption.source != "human":
                continue
            for word in _WORD.findall(caption.text.lower()):
                if word not in _STOPWORDS:
                    counts[row, _bucket(word, dim)] += 1.0
    document_freq = (counts > 0).sum(0).float()
    idf = torch.log((1 + len(records)) / (1 + document_freq)) + 1.0
    features = counts * idf
    return features / features.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _spherical_kmeans(x: Tensor, k: int, generator: torch.Generator, iters: int = 25) -> Tensor:
    """Cluster index (N,) of unit rows ``x`` (N, d); greedy k-means++ seeding, cosine assignment."""
    n = x.shape[0]
    centres = [x[int(torch.randint(n, (1,), generator=generator))]]
    # Greedy k-means++ (as scikit-learn): of several candidates drawn by distance, keep the one that
    # lowers the total distance most. Plain k-means++ often seeds two centres in one large topic when
    # the topics are unbalanced, which is exactly the case a balanced meta set is for.
    trials = 2 + int(math.log(k))
    dist = (1 - x @ centres[0]).clamp_min(0)  # (N,) distance to the closest centre so far
    for _ in range(1, k):
        probs = dist / dist.sum() if dist.sum() > 0 else torch.full((n,), 1.0 / n)
        candidates = torch.multinomial(probs, min(trials, n), replacement=True, generator=generator)
        # (trials, N): the distances if each candidate were added
        trial_dist = torch.minimum(dist[None], (1 - x[candidates] @ x.T).clamp_min(0))
        best = int(trial_dist.sum(1).argmin())
        centres.append(x[candidates[best]])
        dist = trial_dist[best]
    centre = torch.stack(centres)  # (k, d)
    assign = torch.zeros(n, dtype=torch.long)
    for _ in range(iters):
        new_assign = (x @ centre.T).argmax(1)
        if torch.equal(new_assign, assign) and _ > 0:
            break
        assign = new_assign
        for c in range(k):
            members = x[assign == c]
            if len(members):
                centre[c] = members.sum(0) / members.sum(0).norm().clamp_min(1e-12)
    return assign


def _best_of_restarts(x: Tensor, k: int, generator: torch.Generator, restarts: int = 8) -> Tensor:
    """The clustering of lowest total cosine distance over several seedings: a single k-means run can
    seed two centres in one large topic and never recover."""
    best, best_cost = None, math.inf
    for _ in range(restarts):
        assign = _spherical_kmeans(x, k, generator)
        centre = torch.zeros(k, x.shape[1]).index_add_(0, assign, x)
        centre = centre / centre.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cost = float((1 - (x * centre[assign]).sum(1)).sum())
        if cost < best_cost - 1e-9:
            best, best_cost = assign, cost
    assert best is not None
    return best


def hold_out_balanced(
    records: list[VideoRecord], count: int, seed: int = 0, clusters: int | None = None
) -> tuple[list[VideoRecord], list[VideoRecord]]:
    """Split ``records`` into (remaining training records, ``count`` meta records).

    The meta records are balanced over ``clusters`` caption-topic clusters (default about sqrt(count),
    at most 32), keep only their human captions, and both lists keep the input order.

    Raises:
        ValueError: ``count`` is not smaller than the number of records.
    """
    if not 0 < count < len(records):
        raise ValueError(f"cannot hold out {count} meta videos from a training split of {len(records)}")
    k = clusters or max(1, min(32, round(math.sqrt(count))))
    generator = torch.Generator().manual_seed(seed)
    assign = _best_of_restarts(caption_features(records), min(k, len(records)), generator)
    members = [torch.nonzero(assign == c).flatten() for c in range(int(assign.max()) + 1)]
    queues = [m[torch.randperm(len(m), generator=generator)].tolist() for m in members if len(m)]
    chosen: list[int] = []
    while len(chosen) < count:
        for queue in queues:
            if queue and len(chosen) < count:
                chosen.append(queue.pop())
    held = set(chosen)
    meta = []
    for i in sorted(held):
        record = records[i]
        human = [c for c in record.captions if c.source == "human"]
        if human:
            meta.append(VideoRecord(record.id, record.video, human, dict(record.meta)))
    return [r for i, r in enumerate(records) if i not in held], meta
