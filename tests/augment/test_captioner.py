"""LlavaCaptioner on a tiny random LLaVA saved like a hub checkpoint, plus the caption clean-up rules.

The tiny model's weights are random, so its answers are gibberish: end-to-end tests switch the word
filters off and check structure, determinism and batching, not wording.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mama.augment.captioner import (
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    CaptionConfig,
    LlavaCaptioner,
    is_degenerate,
    postprocess,
    resolve_device,
    resolve_dtype,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see conftest


def _tiny_cfg(folder: Path, **overrides: object) -> CaptionConfig:
    """Filters off (gibberish would be dropped), few tokens, CPU."""
    settings: dict = {"model": str(folder), "min_words": 0, "max_words": 0, "repeat_ngram": 0,
                      "max_new_tokens": 8, "device": "cpu"}  # fmt: skip
    settings.update(overrides)
    return CaptionConfig(**settings)


def _images(n: int, seed: int, shape: tuple[int, ...] = (48, 64, 3)) -> list[torch.Tensor]:
    """``n`` random uint8 images; not square, so the processor's resize + centre crop is exercised."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, shape, dtype=torch.uint8, generator=generator) for _ in range(n)]


def test_defaults_follow_the_paper() -> None:
    cfg = CaptionConfig()
    assert (cfg.model, cfg.prompt) == (DEFAULT_MODEL, "In a sentence, describe the process in the video.")
    assert cfg.prompt == DEFAULT_PROMPT
    assert (cfg.num_captions, cfg.temperature) == (2, 0.2)


def test_generation_settings_are_json_ready() -> None:
    settings = CaptionConfig(seed=3, multi_frame=True).generation()
    assert json.loads(json.dumps(settings)) == settings
    assert settings["seed"] == 3 and settings["multi_frame"] is True and settings["temperature"] == 0.2
    assert "device" not in settings  # where it ran does not change what it says


@pytest.mark.parametrize(
    "bad", [{"num_captions": 0}, {"temperature": -0.1}, {"top_p": 0.0}, {"batch_size": 0}, {"dtype": "int8"}]
)
def test_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValueError):
        CaptionConfig(**bad)


def test_loads_through_from_pretrained_and_captions_grids(tiny_llava_dir: Path) -> None:
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    captioner = LlavaCaptioner(_tiny_cfg(tiny_llava_dir, batch_size=2))
    assert isinstance(captioner.model, LlavaForConditionalGeneration)
    assert isinstance(captioner.processor, LlavaProcessor)
    assert captioner.processor.tokenizer.padding_side == "left"
    assert captioner.prompt(1).count("<image>") == 1 and DEFAULT_PROMPT in captioner.prompt(1)

    captions = captioner.caption(_images(3, seed=0))
    assert len(captions) == 3
    for per_video in captions:
        assert 1 <= len(per_video) <= 2
        assert all(isinstance(text, str) and text and text == postprocess(text) for text in per_video)
        assert len(set(per_video)) == len(per_video)


def test_sampling_is_seeded_and_leaves_global_rng_alone(tiny_llava_dir: Path) -> None:
    videos = _images(3, seed=1)
    first = LlavaCaptioner(_tiny_cfg(tiny_llava_dir, seed=0))
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    captions = first.caption(videos)
    assert torch.equal(torch.rand(3), expected_draw)

    assert LlavaCaptioner(_tiny_cfg(tiny_llava_dir, seed=0)).caption(videos) == captions
    # A different seed draws other tokens (for this fixed tiny model and these inputs it does).
    assert LlavaCaptioner(_tiny_cfg(tiny_llava_dir, seed=1)).caption(videos) != captions


@pytest.mark.parametrize("multi_frame", [False, True])
def test_left_padded_batches_match_one_by_one(tiny_llava_dir: Path, multi_frame: bool) -> None:
    if multi_frame:  # 1, 2 and 4 frames: prompts of different lengths, so the batch really is padded
        frames = _images(7, seed=2, shape=(32, 32, 3))
        videos: list = [frames[0], frames[1:3], torch.stack(frames[3:7])]
    else:
        videos = _images(3, seed=2)
    greedy = {"temperature": 0.0, "multi_frame": multi_frame, "max_new_tokens": 12}
    batched = LlavaCaptioner(_tiny_cfg(tiny_llava_dir, batch_size=3, **greedy)).caption(videos)
    single = LlavaCaptioner(_tiny_cfg(tiny_llava_dir, batch_size=1, **greedy)).caption(videos)
    assert batched == single
    assert all(len(per_video) == 1 for per_video in batched)  # greedy: the K generations would be identical


def test_multi_frame_passes_one_placeholder_per_frame(tiny_llava_dir: Path) -> None:
    captioner = LlavaCaptioner(_tiny_cfg(tiny_llava_dir, multi_frame=True, num_captions=2))
    assert captioner.prompt(4).count("<image>") == 4
    stacked = torch.stack(_images(4, seed=3, shape=(32, 40, 3)))  # (N, H, W, 3)
    as_list = _images(4, seed=4, shape=(32, 40, 3))
    captions = captioner.caption([stacked, as_list])
    assert len(captions) == 2 and all(1 <= len(per_video) <= 2 for per_video in captions)


def test_llava_next_checkpoints_load_their_own_class(tmp_path: Path) -> None:
    from transformers import LlavaNextForConditionalGeneration

    from tiny_llava import save_tiny_llava

    folder = save_tiny_llava(tmp_path / "tiny_llava_next", variant="llava_next")
    captioner = LlavaCaptioner(_tiny_cfg(folder, multi_frame=True))
    assert isinstance(captioner.model, LlavaNextForConditionalGeneration)
    # NeXT tiles each image by its aspect ratio, so images of one batch give different token counts.
    videos = [_images(1, seed=5, shape=(32, 64, 3))[0], _images(2, seed=6, shape=(64, 32, 3))]
    captions = captioner.caption(videos)
    assert len(captions) == 2 and all(captions)


def test_grid_mode_rejects_frame_stacks_and_bad_images(tiny_llava_dir: Path) -> None:
    captioner = LlavaCaptioner(_tiny_cfg(tiny_llava_dir))
    with pytest.raises(ValueError, match="multi_frame"):
        captioner.caption([torch.zeros(4, 32, 32, 3, dtype=torch.uint8)])
    with pytest.raises(ValueError, match="uint8"):
        captioner.caption([torch.zeros(32, 32, 3)])


def test_bad_model_folder_error_names_it(tmp_path: Path) -> None:
    for folder in (tmp_path / "missing", tmp_path):  # absent, and present but without config.json
        with pytest.raises(OSError, match=str(folder)):
            LlavaCaptioner(CaptionConfig(model=str(folder)))


def test_non_llava_checkpoint_is_refused(tiny_clip_dir: Path) -> None:
    with pytest.raises(ValueError, match="'clip'"):
        LlavaCaptioner(CaptionConfig(model=str(tiny_clip_dir)))


def test_cpu_resolves_to_fp32(tiny_llava_dir: Path) -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == torch.bfloat16 and resolve_dtype("fp16", cpu) == torch.float16
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        captioner = LlavaCaptioner(_tiny_cfg(tiny_llava_dir, device="auto", dtype="auto"))
        assert captioner.device == cpu and captioner.model.dtype == torch.float32
    with pytest.raises(ValueError):
        resolve_dtype("fp8", cpu)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  The image shows a man cutting an onion.  ", "The video shows a man cutting an onion."),
        ("Image of a woman folding paper", "Video of a woman folding paper"),
        ("These images show\n\n a  dog\tplaying", "These video show a dog playing"),
        ("IMAGES of a cake", "VIDEO of a cake"),
        ("In the image, images of cars.", "In the video, video of cars."),
        ("The imagery is imaginative", "The imagery is imaginative"),  # word-wise only
        ("   ", ""),
    ],
)
def test_postprocess(raw: str, clean: str) -> None:
    assert postprocess(raw) == clean


def test_repetition_filter() -> None:
    cfg = CaptionConfig()  # repeat_ngram 4, min_words 3, max_words 60
    assert is_degenerate("a man is cutting a man is cutting a man is cutting", cfg)
    assert is_degenerate("A man is cutting, a man is cutting... a man is cutting an onion", cfg)  # case, punctuation
    assert is_degenerate("the video shows " + "cutting " * 6, cfg)  # period-1 loop
    normal = "A man is cutting an onion on a board and then a man is cutting bread."  # the 4-gram twice only
    assert not is_degenerate(normal, cfg)
    assert not is_degenerate("a man is cutting a man is cutting a man is cutting", CaptionConfig(repeat_ngram=0))


def test_length_filter() -> None:
    cfg = CaptionConfig(min_words=3, max_words=10)
    assert is_degenerate("", cfg) and is_degenerate("...", cfg)
    assert is_degenerate("Cooking.", cfg)
    assert not is_degenerate("A person cooks rice.", cfg)
    assert is_degenerate(" ".join(f"word{i}" for i in range(11)), cfg)
    assert not is_degenerate("Cooking.", CaptionConfig(min_words=0))
    assert is_degenerate("", CaptionConfig(min_words=0, max_words=0, repeat_ngram=0))  # empty is never a caption
