"""Data pipeline: the common record type, video decoding/encoding, and the SynthVL benchmark.

Submodules are independent pure parts (style guide, habit 6); import them directly, e.g.
``from mama.data.synthvl import generate``. The record type and decoder are re-exported here.
"""

from mama.data.records import Caption, VideoRecord, read_jsonl, write_jsonl
from mama.data.video import VideoDecodeError, count_frames, decode_frames, write_video

__all__ = [
    "Caption",
    "VideoRecord",
    "read_jsonl",
    "write_jsonl",
    "VideoDecodeError",
    "count_frames",
    "decode_frames",
    "write_video",
]
