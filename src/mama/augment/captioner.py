"""LVLM caption augmentation: describe each video's keyframes with LLaVA (MAMA, method section 3).

The authors give LLaVA-1.5-7B one 3 x 4 grid of keyframes per video with the prompt
"In a sentence, describe the process in the video.", sample two generations at temperature 0.2, and
replace "image(s)" with "video" in the answers. ``LlavaCaptioner`` does that through Hugging Face
transformers for any LLaVA-1.5 / LLaVA-NeXT checkpoint (a hub id or a local folder), in batches, with
seeded sampling so that reruns give the same captions, and drops degenerate answers (too short, too long,
or stuck in a repetition loop) instead of letting them into the training captions.

Inputs are uint8 images laid out ``(H, W, 3)``; several frames of one video are ``(N, H, W, 3)`` or a list.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
DEFAULT_PROMPT = "In a sentence, describe the process in the video."

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Model class for each supported config ``model_type``; both share the processor/generate interface.
_MODEL_CLASSES = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
}

# An n-gram seen this many times marks a repetition loop ("a man is cutting a man is cutting a man is ...").
_REPEAT_LIMIT = 3

_IMAGE_WORD = re.compile(r"\bimages?\b", flags=re.IGNORECASE)
_WORD = re.compile(r"[\w']+")


@dataclass
class CaptionConfig:
    """How to caption videos with a LLaVA model.

    ``temperature`` 0 decodes greedily (then every generation would be identical, so one is made).
    ``device`` "auto" picks CUDA when available; ``dtype`` "auto" picks bf16 on CUDA (fp16 where bf16 is
    unsupported) and fp32 on CPU. ``min_words`` / ``max_words`` / ``repeat_ngram`` configure
    ``is_degenerate`` (0 disables each). Sampling is seeded per batch from ``seed`` and the index of the
    batch's first video, so the same videos in the same batches give the same captions.
    """

    model: str = DEFAULT_MODEL
    prompt: str = DEFAULT_PROMPT
    num_captions: int = 2
    temperature: float = 0.2
    top_p: float = 1.0
    max_new_tokens: int = 64
    min_words: int = 3
    max_words: int = 60
    repeat_ngram: int = 4
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 4
    multi_frame: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_captions", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("min_words", "max_words", "repeat_ngram", "seed"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.dtype != "auto" and self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {self.dtype!r}")

    def generation(self) -> dict[str, Any]:
        """The settings that shape the captions, recorded next to each caption (the JSONL "generation" field).

        ``batch_size`` is included because the sampling seed of a batch depends on where the batch starts,
        and ``dtype`` because precision changes which tokens win; ``device`` only says where it ran.
        """
        keep = ("model", "prompt", "num_captions", "temperature", "top_p", "max_new_tokens", "min_words",
                "max_words", "repeat_ngram", "dtype", "batch_size", "multi_frame", "seed")  # fmt: skip
        settings = asdict(self)
        return {name: settings[name] for name in keep}


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> CUDA when available (under torchrun the rank's own GPU, ``cuda:LOCAL_RANK``), else
    CPU; any other name is passed to ``torch.device``."""
    if name == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local_rank = os.environ.get("LOCAL_RANK")
        return torch.device(f"cuda:{int(local_rank) % torch.cuda.device_count()}" if local_rank else "cuda")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` -> bf16 on CUDA when supported, else fp16 on CUDA, and fp32 on CPU (where half precision
    is slow and bf16 matmuls lose accuracy); ``"fp32"`` / ``"bf16"`` / ``"fp16"`` as named."""
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(_DTYPES)}, got {name!r}")
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def postprocess(text: str) -> str:
    """Clean one LLaVA answer: strip, the words "image"/"images" -> "video", collapse whitespace.

    The model sees a single grid image, so it talks about "the image"; the caption is about the video.
    Replacement is word-wise ("imagery" stays) and keeps the case: "Image" -> "Video", "IMAGES" -> "VIDEO".
    """

    def to_video(match: re.Match[str]) -> str:
        word = match.group(0)
        if len(word) > 1 and word.isupper():
            return "VIDEO"
        return "Video" if word[0].isupper() else "video"

    return " ".join(_IMAGE_WORD.sub(to_video, text.strip()).split())


def is_degenerate(text: str, cfg: CaptionConfig) -> bool:
    """Whether a (post-processed) caption should be dropped.

    Words are runs of letters, digits, underscores and apostrophes, compared in lower case. A caption is
    degenerate when it has no words; when it has fewer than ``cfg.min_words`` or more than
    ``cfg.max_words`` words (each check off at 0); or, with ``n = cfg.repeat_ngram > 0``, when some
    sequence of n consecutive words occurs 3 or more times in it, overlapping occurrences counted. That
    catches LLaVA's repetition loops whatever their period: "a man is cutting a man is cutting a man is
    cutting" (period 4), "cutting cutting cutting cutting cutting cutting" (period 1), and a longer phrase
    said three times; a normal sentence almost never repeats a 4-word phrase three times.
    """
    words = _WORD.findall(text.lower())
    if not words:
        return True
    if cfg.min_words and len(words) < cfg.min_words:
        return True
    if cfg.max_words and len(words) > cfg.max_words:
        return True
    n = cfg.repeat_ngram
    if n and len(words) >= n:
        counts = Counter(tuple(words[i : i + n]) for i in range(len(words) - n + 1))
        if max(counts.values()) >= _REPEAT_LIMIT:
            return True
    return False


def _to_pil(image: Tensor) -> Any:  # -> PIL.Image.Image
    """One uint8 ``(H, W, 3)`` image as PIL: channels-last is then unambiguous to the image processor."""
    from PIL import Image

    image = torch.as_tensor(image)
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected a uint8 image of shape (H, W, 3), got {image.dtype} {tuple(image.shape)}")
    return Image.fromarray(image.detach().cpu().numpy())


def _video_images(video: Tensor | Sequence[Tensor], multi_frame: bool) -> list[Any]:
    """The PIL images for one video: its grid image, or (``multi_frame``) each of its frames."""
    if isinstance(video, Tensor) and video.ndim == 3:
        return [_to_pil(video)]
    if not multi_frame:
        raise ValueError(
            "expected one grid image (H, W, 3) per video; pass several frames only with multi_frame=True, "
            f"got {tuple(video.shape) if isinstance(video, Tensor) else f'a list of {len(video)}'}"
        )
    frames = list(video.unbind(0)) if isinstance(video, Tensor) else list(video)  # (N, H, W, 3) -> N x (H, W, 3)
    if not frames:
        raise ValueError("a video needs at least one frame")
    return [_to_pil(frame) for frame in frames]


def _batch_seed(seed: int, start: int) -> int:
    """A 32-bit seed for the batch starting at video ``start``, well mixed from (``seed``, ``start``).

    Mixed rather than added (seed 1 at video 0 must not replay seed 0 at video 1) and 32-bit because the
    CPU generator keeps only the low 32 bits of ``torch.manual_seed``'s argument.
    """
    return int(np.random.SeedSequence([seed, start]).generate_state(1)[0])


class LlavaCaptioner:
    """Caption videos with a LLaVA-1.5 / LLaVA-NeXT checkpoint (hub id or folder saved by ``save_pretrained``).

    Loads ``AutoProcessor`` and the model class of the config's ``model_type`` in ``cfg.dtype`` on
    ``cfg.device``; the tokenizer pads on the left so that every prompt of a batch ends where generation
    starts.
    """

    def __init__(self, cfg: CaptionConfig) -> None:
        import transformers
        from transformers import AutoConfig, AutoProcessor

        self.cfg = cfg
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        try:
            config = AutoConfig.from_pretrained(cfg.model)
        except (OSError, ValueError) as err:
            raise OSError(
                f"cannot load a LLaVA model from {cfg.model!r}: it must be a folder written by save_pretrained "
                f"(with config.json) or a hub id that is reachable or cached ({err})"
            ) from err
        if config.model_type not in _MODEL_CLASSES:
            raise ValueError(
                f"{cfg.model!r} is a {config.model_type!r} model; the captioner supports {sorted(_MODEL_CLASSES)}"
            )
        model_class = getattr(transformers, _MODEL_CLASSES[config.model_type])
        self.processor = AutoProcessor.from_pretrained(cfg.model)
        tokenizer = self.processor.tokenizer
        tokenizer.padding_side = "left"
        if tokenizer.pad_token is None:  # batching needs some pad id; it is masked out anyway
            tokenizer.pad_token = tokenizer.eos_token
        self.model = model_class.from_pretrained(cfg.model, config=config, dtype=self.dtype).to(self.device).eval()
        self._prompts: dict[tuple[int, str], str] = {}

    def prompt(self, num_images: int) -> str:
        """The chat-formatted ``cfg.prompt`` with ``num_images`` image placeholders (cached)."""
        key = (num_images, self.cfg.prompt)
        if key not in self._prompts:
            content: list[dict[str, str]] = [{"type": "image"} for _ in range(num_images)]
            content.append({"type": "text", "text": self.cfg.prompt})
            conversation = [{"role": "user", "content": content}]
            self._prompts[key] = self.processor.apply_chat_template(conversation, add_generation_prompt=True)
        return self._prompts[key]

    def caption(self, videos: Sequence[Tensor | Sequence[Tensor]], offset: int = 0) -> list[list[str]]:
        """Captions for each video: up to ``cfg.num_captions`` post-processed, distinct, non-degenerate strings.

        Each video is a uint8 grid image ``(H, W, 3)`` or, with ``cfg.multi_frame``, its frames as
        ``(N, H, W, 3)`` or a list of ``(H, W, 3)`` (one image placeholder per frame). A list can be shorter
        than ``num_captions`` (even empty) when generations are dropped or repeat each other.

        ``offset`` shifts the sampling seed of every batch (the seed mixes ``cfg.seed`` with the index of
        the batch's first video plus ``offset``): a caller that captions a long list in several calls
        passes a different offset per call, or every call replays the same random stream.
        """
        captions: list[list[str]] = []
        for start in range(0, len(videos), self.cfg.batch_size):
            captions.extend(self._caption_batch(videos[start : start + self.cfg.batch_size], offset + start))
        return captions

    @torch.inference_mode()
    def _caption_batch(self, videos: Sequence[Tensor | Sequence[Tensor]], start: int) -> list[list[str]]:
        cfg = self.cfg
        per_video = [_video_images(video, cfg.multi_frame) for video in videos]
        prompts = [self.prompt(len(images)) for images in per_video]
        # The model fills the <image> placeholders of the whole batch, in order, from one flat list.
        flat_images = [image for images in per_video for image in images]
        inputs = self.processor(
            images=flat_images, text=prompts, padding=True, return_tensors="pt", return_token_type_ids=False
        )
        inputs = {name: value.to(self.device) for name, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)

        sample = cfg.temperature > 0
        num_sequences = cfg.num_captions if sample else 1  # greedy decoding would repeat one caption K times
        settings: dict[str, Any] = {
            "max_new_tokens": cfg.max_new_tokens,
            "num_return_sequences": num_sequences,
            "pad_token_id": self.processor.tokenizer.pad_token_id,
            "do_sample": sample,
        }
        if sample:
            # top_k=0: LLaVA's own sampler uses temperature and top-p only, while generate() would otherwise
            # add its default top-k of 50.
            settings.update(temperature=cfg.temperature, top_p=cfg.top_p, top_k=0)
        else:  # the checkpoint's generation_config may carry sampling defaults that greedy decoding rejects
            settings.update(temperature=None, top_p=None, top_k=None)

        # A private RNG stream per batch: reruns reproduce captions without disturbing the caller's RNG.
        cuda_devices = []
        if self.device.type == "cuda":
            cuda_devices = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        with torch.random.fork_rng(devices=cuda_devices):
            torch.manual_seed(_batch_seed(cfg.seed, start))
            output = self.model.generate(**inputs, **settings)  # (B * num_sequences, prompt + new tokens)

        # Left padding puts every prompt's end at the same column, so the answers start there.
        new_tokens = output[:, inputs["input_ids"].shape[1] :]
        texts = self.processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        result = []
        for i in range(len(videos)):
            kept: list[str] = []
            for text in texts[i * num_sequences : (i + 1) * num_sequences]:  # generate keeps each video's K together
                text = postprocess(text)
                if text not in kept and not is_degenerate(text, cfg):
                    kept.append(text)
            result.append(kept)
        return result
