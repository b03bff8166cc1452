"""Data pipeline: the common record type, dataset readers, video decoding, frame sampling, transforms,
and the SynthVL benchmark.

Submodules are independent pure parts (style guide, habit 6); import them directly, e.g.
``from mama.data.synthvl import generate``. The record type and decoder are re-exported here.
"""

from mama.data.records import Caption, VideoRecord, read_jsonl, write_jsonl
from mama.data.video import VideoDecodeError, VideoInfo, count_frames, decode_frames, probe_video, write_video

__all__ = [
    "Caption",
    "VideoDecodeError",
    "VideoInfo",
    "VideoRecord",
    "count_frames",
    "decode_frames",
    "probe_video",
    "read_jsonl",
    "write_jsonl",
    "write_video",
]
