"""A tiny random LLaVA-1.5 (model + processor) saved like a hub checkpoint, for offline tests.

``save_tiny_llava(folder)`` writes what ``LlavaForConditionalGeneration.save_pretrained`` and
``LlavaProcessor.save_pretrained`` write (``variant="llava_next"``: the LLaVA-NeXT classes), so
``CaptionConfig(model=str(folder))`` goes through exactly the code path ``llava-hf/llava-1.5-7b-hf`` takes
(AutoConfig -> model class by ``model_type``, AutoProcessor, chat template), without the network. The
weights are random, so generations are gibberish tokens.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Caption-like English: the byte-level BPE merges learned from it keep the prompt a few dozen tokens.
_WORDS = """
a an the this that these those one two three some many of in on at to from with by for into onto over under
and or but then while after before as is are was were be being been has have had it its they their he she his
her man woman person people child hands hand finger knife board bowl pan pot plate cup glass bottle water oil
salt sugar flour egg eggs butter milk bread cheese onion onions tomato tomatoes garlic pepper meat chicken fish
rice pasta sauce soup salad fruit apple banana lemon orange carrot potato potatoes dough oven stove table
kitchen counter spoon fork whisk cut cuts cutting chop chops chopping slice slices slicing mix mixes mixing
stir stirs stirring pour pours pouring add adds adding put puts putting place places placing cook cooks
cooking fry fries frying boil boils boiling bake bakes baking wash washes washing peel peels peeling open
opens opening close closes closing hold holds holding take takes taking use uses using show shows showing
make makes making prepare prepares preparing clean cleans cleaning fold folds folding roll rolls rolling
spread spreads spreading press presses pressing remove removes removing turn turns turning move moves moving
video image images process step steps first next finally then process demonstrates describes sentence
small large big red green yellow white black brown hot cold fresh piece pieces top bottom side left right
car wheel tire tool tools wood paint brush wall floor paper box bag shirt hair face dog cat ball game
user assistant describe what how why where when which who
"""

BOS, EOS, PAD, UNK, IMAGE = "<s>", "</s>", "<pad>", "<unk>", "<image>"

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT:"), images first, then the text.
# Newlines are written as {{ '\n' }} Jinja literals so the template survives JSON round trips.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{{ '\\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


# Config, model, image processor (the PIL backend: no torchvision here) and processor class per variant.
_CLASSES = {
    "llava": ("LlavaConfig", "LlavaForConditionalGeneration", "CLIPImageProcessorPil", "LlavaProcessor"),
    "llava_next": (
        "LlavaNextConfig",
        "LlavaNextForConditionalGeneration",
        "LlavaNextImageProcessorPil",
        "LlavaNextProcessor",
    ),
}


def build_tiny_llava_tokenizer(num_merges: int = 300):  # -> PreTrainedTokenizerFast
    """A byte-level BPE (Llama-like: ``<s>`` prepended, ``</s>`` = EOS) with ``<image>`` as a special token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [UNK, BOS, EOS, PAD, IMAGE]
    bpe = Tokenizer(models.BPE(unk_token=UNK))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + len(alphabet) + num_merges,
        special_tokens=specials,
        initial_alphabet=alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator([_WORDS], trainer)
    # Llama's tokenizer prepends BOS to every sequence; the LLaVA chat template relies on that.
    bpe.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bpe.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens={"image_token": IMAGE}, model_max_length=512,
    )  # fmt: skip


def save_tiny_llava(
    folder: Path,
    image_size: int = 32,
    patch_size: int = 16,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    seed: int = 0,
    variant: str = "llava",
) -> Path:
    """Save a random tiny ``LlavaForConditionalGeneration`` and its ``LlavaProcessor`` into ``folder``
    exactly as ``save_pretrained`` lays out a hub checkpoint.

    CLIP vision tower + Llama text model, both ``hidden_size`` wide with ``num_layers`` layers. Each image
    becomes ``(image_size / patch_size) ** 2`` image tokens: the CLIP tower adds a CLS token
    (``num_additional_image_tokens=1``) that ``vision_feature_select_strategy="default"`` drops again.
    ``variant="llava_next"`` saves the LLaVA-NeXT classes instead (images tiled at up to 2 x 1 base sizes,
    so the token count per image varies). Returns ``folder`` (created).
    """
    import transformers
    from transformers import CLIPVisionConfig, LlamaConfig

    if image_size % patch_size:
        raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
    if variant not in _CLASSES:
        raise ValueError(f"variant must be one of {sorted(_CLASSES)}, got {variant!r}")
    config_class, model_class, image_processor_class, processor_class = (
        getattr(transformers, name) for name in _CLASSES[variant]
    )
    folder = Path(folder)
    tokenizer = build_tiny_llava_tokenizer()
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE)
    tower = {"hidden_size": hidden_size, "intermediate_size": 2 * hidden_size, "num_hidden_layers": num_layers,
             "num_attention_heads": num_heads}  # fmt: skip
    # LLaVA-NeXT tiles each image at the best of these resolutions (plus a downscaled overview).
    pinpoints = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    grid = {"image_grid_pinpoints": pinpoints} if variant == "llava_next" else {}
    config = config_class(
        **grid,
        vision_config=CLIPVisionConfig(**tower, image_size=image_size, patch_size=patch_size),
        text_config=LlamaConfig(
            **tower,
            num_key_value_heads=num_heads,
            vocab_size=len(tokenizer),
            max_position_embeddings=512,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        image_token_id=image_token_id,
        image_seq_length=(image_size // patch_size) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(str(folder))

    # The hub checkpoint's processor resizes the shortest edge and centre-crops to a square, like this one.
    image_processor = image_processor_class(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}, **grid
    )
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(str(folder))
    return folder
