"""A tiny random CLIP (model + tokenizer) saved like a hub checkpoint, for offline tests.

``save_tiny_clip(folder)`` writes what ``CLIPModel.save_pretrained`` and ``CLIPTokenizer.save_pretrained``
write, so ``ModelConfig(name="clip", pretrained=str(folder))`` goes through exactly the code path a hub id
takes, without the network.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Words of SynthVL-like captions: the BPE merges learned from them keep token sequences short.
_WORDS = (
    "a an the small large big tiny red blue green yellow purple white black gray circle square cross "
    "triangle diamond moves slides drifts left right up down on across against background screen and is"
)

# CLIP's own pre-tokenisation (transformers' CLIPTokenizer): the learned merges must apply to these pieces.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _train_merges(num_merges: int) -> list[tuple[str, str]]:
    """BPE merges (CLIP style: byte-level pieces, ``</w>`` ending each word) learned from ``_WORDS``."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # The alphabet (256 byte symbols, plus their </w> forms that occur) comes first, then the merges.
    trainer = trainers.BpeTrainer(
        vocab_size=2 * len(alphabet) + num_merges,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
    )
    bpe.train_from_iterator([_WORDS], trainer)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return [tuple(pair) for pair in merges[:num_merges]]


def build_tiny_clip_tokenizer(model_max_length: int = 32, num_merges: int = 64):  # -> CLIPTokenizer
    """A ``CLIPTokenizer`` laid out like OpenAI's: every byte symbol and its ``</w>`` form, the learned
    merges, then ``<|startoftext|>`` and ``<|endoftext|>`` with the two largest ids (EOS = pad = unk)."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    merges = _train_merges(num_merges)
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for token in alphabet + [c + "</w>" for c in alphabet] + ["".join(pair) for pair in merges] + [BOS, EOS]:
        vocab.setdefault(token, len(vocab))
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)


def save_tiny_clip(
    folder: Path,
    image_size: int = 32,
    patch_size: int = 16,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    projection_dim: int = 16,
    max_text_positions: int = 32,
    seed: int = 0,
) -> Path:
    """Save a random tiny ``CLIPModel`` and its tokenizer into ``folder`` (created); returns ``folder``.

    The text config's ``eos_token_id`` is the tokenizer's EOS id (not the legacy 2), so the text tower
    pools at the first EOS token.
    """
    from transformers import CLIPConfig, CLIPModel

    folder = Path(folder)
    tokenizer = build_tiny_clip_tokenizer(model_max_length=max_text_positions)
    tower = {"hidden_size": hidden_size, "intermediate_size": 2 * hidden_size, "num_hidden_layers": num_layers,
             "num_attention_heads": num_heads}  # fmt: skip
    config = CLIPConfig(
        text_config=dict(
            tower,
            vocab_size=len(tokenizer),
            max_position_embeddings=max_text_positions,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(tower, image_size=image_size, patch_size=patch_size),
        projection_dim=projection_dim,
    )
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder
