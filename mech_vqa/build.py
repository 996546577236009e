"""Build LLaVA models, word-level tokenizers and processors locally, with no download.

Used for the tiny test models, the benchmark models and the model organism. Everything is an
ordinary HuggingFace object (``LlavaForConditionalGeneration``, ``PreTrainedTokenizerFast``,
``LlavaProcessor``) so that ``save_pretrained`` / ``from_pretrained`` round-trip with plain
transformers.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
IMAGE_TOKEN = "<image>"
# Words every word-level vocabulary needs for the LLaVA-1.5 prompt format.
PROMPT_WORDS = ("user", "assistant", ":", "?", ".", ",")


def word_level_tokenizer(words: Iterable[str], special_tokens: Iterable[str] = (),
                         extra_special: dict[str, str] | None = None):
    """A fast word-level tokenizer over ``words`` plus the special and prompt tokens.

    Text is lower-cased and split on whitespace and punctuation (so ``words`` are lower case);
    ``<image>`` is an added special token so the processor can expand it. Unknown words map to
    ``<unk>``. ``special_tokens``: more tokens matched whole before splitting (Qwen-VL's
    ``<|image_pad|>`` and its delimiters). ``extra_special``: more named special tokens
    (``{"boi_token": "<start_of_image>"}``), each one token and an attribute of the tokenizer, as a
    family's processor expects.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    special_tokens = tuple(special_tokens)
    extra_special = dict(extra_special or {})
    for word in (*SPECIAL_TOKENS, *special_tokens, *extra_special.values(), *PROMPT_WORDS, *words):
        if word not in vocab:
            vocab[word] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        extra_special_tokens={"image_token": IMAGE_TOKEN, **extra_special},
        padding_side="left",
    )
    if special_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return tokenizer


def _image_processor_class(name: str):
    import transformers

    # transformers 5.x names the PIL-based processors ``...Pil``; older versions only have the plain name
    return getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)


def llava_processor(tokenizer, image_size: int, patch_size: int, image_mean=None, image_std=None, *,
                    vision_model: str = "clip"):
    """A ``LlavaProcessor`` for square images.

    ``vision_model="clip"`` (LLaVA-1.5): shortest-edge resize and centre crop, the ``default``
    strategy dropping CLS. ``"siglip"`` (LLaVA-Interleave): a plain resize, no class token, the
    ``full`` strategy.
    """
    from transformers import LlavaProcessor

    if vision_model not in ("clip", "siglip"):
        raise ValueError(f"unknown vision_model {vision_model!r}; choose 'clip' or 'siglip'")
    if vision_model == "clip":
        image_processor = _image_processor_class("CLIPImageProcessor")(
            size={"shortest_edge": image_size},
            crop_size={"height": image_size, "width": image_size},
            image_mean=list(image_mean or (0.48145466, 0.4578275, 0.40821073)),
            image_std=list(image_std or (0.26862954, 0.26130258, 0.27577711)),
        )
    else:
        image_processor = _image_processor_class("SiglipImageProcessor")(
            size={"height": image_size, "width": image_size},
            image_mean=list(image_mean or (0.5, 0.5, 0.5)), image_std=list(image_std or (0.5, 0.5, 0.5)),
        )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=patch_size,
        vision_feature_select_strategy="default" if vision_model == "clip" else "full",
        num_additional_image_tokens=1 if vision_model == "clip" else 0,  # CLIP's CLS token
    )


def llava_next_processor(tokenizer, image_size: int, patch_size: int, grid_pinpoints):
    """A ``LlavaNextProcessor`` (anyres tiles of ``image_size``, CLIP normalisation, ``default`` strategy)."""
    from transformers import LlavaNextProcessor

    image_processor = _image_processor_class("LlavaNextImageProcessor")(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=[list(p) for p in grid_pinpoints],
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1)


TEXT_MODELS = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "gemma": "GemmaConfig"}


def llava_config(
    tokenizer,
    *,
    image_size: int = 32,
    patch_size: int = 8,
    vision_hidden: int = 32,
    vision_layers: int = 2,
    vision_heads: int = 2,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int | None = None,
    intermediate: int | None = None,
    max_positions: int = 512,
    text_model: str = "llama",
    sliding_window: int | None = None,
    vision_model: str = "clip",
):
    """A ``LlavaConfig`` with a CLIP vision tower and a text model sized by the arguments.

    ``text_model``: ``"llama"`` (LLaVA-1.5), ``"mistral"`` (BakLLaVA), ``"qwen2"`` (LLaVA-Interleave,
    with q/k/v biases) or ``"gemma"`` (LLaVA-Gemma: norms scale by ``1 + weight``, embeddings by
    ``sqrt(d)``). ``sliding_window``: Mistral slides in every layer, Qwen2 in every layer but
    the first (``max_window_layers=1``), so one model mixes both kinds. ``vision_model``: ``"clip"``
    (class token dropped by the ``default`` strategy) or ``"siglip"`` (no class token, ``full``).
    """
    import transformers
    from transformers import CLIPVisionConfig, LlavaConfig

    if text_model not in TEXT_MODELS:
        raise ValueError(f"unknown text_model {text_model!r}; choose one of {sorted(TEXT_MODELS)}")
    extra = {"head_dim": hidden // heads} if text_model == "gemma" else {}  # Gemma's default is 256
    if sliding_window is not None:
        if text_model in ("llama", "gemma"):
            raise ValueError(f"{text_model} has no sliding window; use text_model='mistral' or 'qwen2'")
        extra["sliding_window"] = sliding_window
        if text_model == "qwen2":
            extra.update(use_sliding_window=True, max_window_layers=1)
    elif text_model == "mistral":
        extra["sliding_window"] = None
    text_config = getattr(transformers, TEXT_MODELS[text_model])(
        **extra,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads or heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=max_positions,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    if vision_model not in ("clip", "siglip"):
        raise ValueError(f"unknown vision_model {vision_model!r}; choose 'clip' or 'siglip'")
    vision_sizes = dict(image_size=image_size, patch_size=patch_size, hidden_size=vision_hidden,
                        intermediate_size=2 * vision_hidden, num_hidden_layers=vision_layers,
                        num_attention_heads=vision_heads)
    if vision_model == "clip":
        vision_config = CLIPVisionConfig(**vision_sizes, projection_dim=vision_hidden)
    else:
        vision_config = transformers.SiglipVisionConfig(**vision_sizes)
    return LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default" if vision_model == "clip" else "full",
        pad_token_id=tokenizer.pad_token_id,
    )


def random_llava(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """``LlavaForConditionalGeneration`` with seeded random weights, in eval mode."""
    from transformers import LlavaForConditionalGeneration

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    return model.to(dtype).eval()


TINY_WORDS = tuple(
    "what is the color of a an dog cat ball red green blue yellow purple white black big small "
    "shape circle square triangle left right top bottom object it".split()
)


def tiny_llava(seed: int = 0, *, kv_heads: int | None = 2, **sizes):
    """A tiny random LLaVA with its processor: ``(model, processor)``. Grouped-query by default."""
    tokenizer = word_level_tokenizer(TINY_WORDS)
    image_size = sizes.pop("image_size", 32)
    patch_size = sizes.pop("patch_size", 8)
    vision_model = sizes.get("vision_model", "clip")
    processor = llava_processor(tokenizer, image_size, patch_size, vision_model=vision_model)
    config = llava_config(tokenizer, image_size=image_size, patch_size=patch_size, kv_heads=kv_heads, **sizes)
    return random_llava(config, seed=seed), processor


def tiny_llava_next(seed: int = 0, *, grid_pinpoints=((32, 64), (64, 32), (64, 64)), **sizes):
    """A tiny random LLaVA-NeXT (anyres: 32 px tiles, up to 2 x 2 of them) with its processor."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    tokenizer = word_level_tokenizer(TINY_WORDS)
    image_size = sizes.pop("image_size", 32)
    patch_size = sizes.pop("patch_size", 8)
    processor = llava_next_processor(tokenizer, image_size, patch_size, grid_pinpoints)
    base = llava_config(tokenizer, image_size=image_size, patch_size=patch_size, kv_heads=sizes.pop("kv_heads", 2),
                        **sizes)
    config = LlavaNextConfig(text_config=base.text_config, vision_config=base.vision_config,
                             image_token_id=base.image_token_id, image_grid_pinpoints=[list(p) for p in grid_pinpoints],
                             vision_feature_layer=-1, vision_feature_select_strategy="default",
                             pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaNextForConditionalGeneration(config)
    return model.eval(), processor


def llava_onevision_processor(tokenizer, image_size: int, patch_size: int, grid_pinpoints,
                              vision_aspect_ratio: str = "anyres_max_9"):
    """An image-only ``LlavaOnevisionProcessor`` (SigLIP normalisation, ``full`` strategy).

    transformers' own constructor insists on a video processor, which needs torchvision; images
    need none, so this subclass leaves it out (everything else is the real processor).
    """
    from transformers import LlavaOnevisionProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyLlavaOnevisionProcessor(LlavaOnevisionProcessor):
        def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None,
                     vision_feature_select_strategy=None, chat_template=None, image_token="<image>",
                     vision_aspect_ratio="anyres_max_9", **kwargs):
            self.num_image_tokens = num_image_tokens
            self.vision_feature_select_strategy = vision_feature_select_strategy
            self.image_token, self.video_token = image_token, "<video>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
            self.video_token_id = None
            self.vision_aspect_ratio = vision_aspect_ratio
            self.video_processor = None
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    image_processor = _image_processor_class("LlavaOnevisionImageProcessor")(
        size={"height": image_size, "width": image_size}, image_grid_pinpoints=[list(p) for p in grid_pinpoints],
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )
    return ImageOnlyLlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                            num_image_tokens=(image_size // patch_size) ** 2,
                                            vision_feature_select_strategy="full",
                                            vision_aspect_ratio=vision_aspect_ratio)


def tiny_llava_onevision(seed: int = 0, *, grid_pinpoints=((32, 32), (32, 64), (64, 32), (64, 64), (32, 96), (96, 32)),
                         vision_aspect_ratio: str = "anyres_max_2", **sizes):
    """A tiny random LLaVA-OneVision (SigLIP, Qwen2, 32 px tiles) with its processor.

    ``anyres_max_2``: a high-resolution grid of more than about two tiles' worth of patches is
    downsampled by the model, so the tiny model exercises that path too.
    """
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    tokenizer = word_level_tokenizer(TINY_WORDS)
    image_size = sizes.pop("image_size", 32)
    patch_size = sizes.pop("patch_size", 8)
    processor = llava_onevision_processor(tokenizer, image_size, patch_size, grid_pinpoints, vision_aspect_ratio)
    base = llava_config(tokenizer, image_size=image_size, patch_size=patch_size, kv_heads=sizes.pop("kv_heads", 2),
                        text_model="qwen2", vision_model="siglip", **sizes)
    config = LlavaOnevisionConfig(text_config=base.text_config, vision_config=base.vision_config,
                                  image_token_id=base.image_token_id,
                                  image_grid_pinpoints=[list(p) for p in grid_pinpoints], vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio=vision_aspect_ratio,
                                  pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config)
    return model.eval(), processor


def role_chat_template(image_token: str, answer_role: str = "assistant") -> str:
    """A tiny model's chat template, ``user : <image_token> {question} <answer_role> :``: each turn is the role,
    a colon and its parts (an image as ``image_token``, which the family's processor expands), with no other
    markers (a word-level vocabulary has no role tokens)."""
    return ("{% for message in messages %}{{ message['role'] }} :{% for item in message['content'] %}"
            "{% if item['type'] == 'image' %} " + image_token + "{% else %} {{ item['text'] }}{% endif %}{% endfor %}"
            "{% endfor %}{% if add_generation_prompt %} " + answer_role + " :{% endif %}")


# ---------------------------------------------------------------------------------- Qwen-VL
QWEN_SPECIAL_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
#: the tiny Qwen-VL prompt: Qwen's chat template (image part as ``<|vision_start|><|image_pad|><|vision_end|>``)
#: minus the system turn and the role markers a word-level vocabulary does not have
QWEN_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] }} :{% for part in message['content'] %}"
                      "{% if part['type'] == 'image' %} <|vision_start|><|image_pad|><|vision_end|>"
                      "{% elif part['type'] == 'text' %} {{ part['text'] }}{% endif %}{% endfor %}{% endfor %}"
                      "{% if add_generation_prompt %} assistant :{% endif %}")

QWEN_FAMILIES = {"qwen2_vl": "Qwen2VL", "qwen2_5_vl": "Qwen2_5_VL", "qwen3_vl": "Qwen3VL"}


def _image_only_qwen_processor_class(family: str):
    """transformers' Qwen-VL processor class of ``family`` without its video processor.

    transformers' constructor wants a video processor, which needs torchvision; images need none, so
    this subclass leaves it out (the video path is refused by the adapter anyway). It is saved under
    the real class's name, so a checkpoint written from it reloads with plain transformers.
    """
    import transformers
    from transformers.processing_utils import ProcessorMixin

    name = QWEN_FAMILIES[family]
    base = getattr(transformers, f"{name}Processor")

    class ImageOnlyQwenVLProcessor(base):
        def __init__(self, image_processor=None, tokenizer=None, video_processor=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            self.vision_start_token, self.vision_end_token = "<|vision_start|>", "<|vision_end|>"
            self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
            self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)
            self.video_processor = None
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        @classmethod
        def get_attributes(cls):
            return ["image_processor", "tokenizer"]

    ImageOnlyQwenVLProcessor.__name__ = f"{name}Processor"  # saved as the real class: AutoProcessor reloads it
    return ImageOnlyQwenVLProcessor


def qwen_vl_processor(tokenizer, *, patch_size: int = 14, merge_size: int = 2, temporal_patch_size: int = 2,
                      min_pixels: int | None = None, max_pixels: int | None = None, image_mean=None,
                      image_std=None, family: str = "qwen2_vl"):
    """An image-only Qwen-VL processor (transformers' own class, its PIL image processor, no video
    processor) with the tiny chat template :data:`QWEN_CHAT_TEMPLATE` (a real checkpoint brings its own).
    ``min_pixels`` / ``max_pixels``: the resize budget (default 4 and 1280 tokens' worth)."""
    factor = patch_size * merge_size
    image_processor = _image_processor_class("Qwen2VLImageProcessor")(
        patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size,
        size={"shortest_edge": min_pixels or 4 * factor * factor, "longest_edge": max_pixels or 1280 * factor * factor},
        image_mean=list(image_mean or (0.48145466, 0.4578275, 0.40821073)),
        image_std=list(image_std or (0.26862954, 0.26130258, 0.27577711)),
    )
    return _image_only_qwen_processor_class(family)(image_processor=image_processor, tokenizer=tokenizer,
                                                    chat_template=QWEN_CHAT_TEMPLATE)


def image_only_processor(source: str):
    """A saved Qwen-VL processor reloaded without its video processor (when torchvision, which the video
    processor needs, is not installed), a saved Mistral-3 ``PixtralProcessor`` reloaded without torchvision,
    or None for other families."""
    import json
    from pathlib import Path

    from transformers import AutoConfig, AutoTokenizer

    family = getattr(AutoConfig.from_pretrained(source), "model_type", None)
    if family == "mistral3":  # transformers' own class and files; its PIL image processor needs no torchvision
        return pixtral_processor_class().from_pretrained(source)
    if family not in QWEN_FAMILIES:
        return None
    tokenizer = AutoTokenizer.from_pretrained(source)
    image_processor = _image_processor_class("Qwen2VLImageProcessor").from_pretrained(source)
    template = Path(source) / "chat_template.jinja"
    chat_template = template.read_text() if template.is_file() else getattr(tokenizer, "chat_template", None)
    if chat_template is None and (Path(source) / "chat_template.json").is_file():
        chat_template = json.loads((Path(source) / "chat_template.json").read_text()).get("chat_template")
    return _image_only_qwen_processor_class(family)(image_processor=image_processor, tokenizer=tokenizer,
                                                    chat_template=chat_template)


def qwen_vl_config(tokenizer, family: str = "qwen2_vl", *, patch_size: int = 8, merge_size: int = 2,
                   vision_hidden: int = 32, vision_layers: int = 2, vision_heads: int = 2, hidden: int = 64,
                   layers: int = 2, heads: int = 4, kv_heads: int | None = 2, intermediate: int | None = None,
                   mrope_section=(2, 3, 3), max_positions: int = 512, window_size: int | None = None,
                   fullatt_block_indexes=(1,), deepstack_visual_indexes=(0,)):
    """A tiny Qwen2-VL / Qwen2.5-VL / Qwen3-VL config (``family``) for ``tokenizer``.

    ``mrope_section`` splits the rotary frequencies (``head_dim / 2`` of them) among the temporal,
    height and width axes. Qwen2.5-VL: ``window_size`` (pixels, default two merged tokens across)
    and the full-attention blocks; Qwen3-VL: the ViT layers whose features DeepStack adds after the
    first decoder layers.
    """
    import transformers

    name = QWEN_FAMILIES[family]
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    head_dim = hidden // heads
    if 2 * sum(mrope_section) != head_dim:
        raise ValueError(f"mrope_section {mrope_section} must cover head_dim / 2 = {head_dim // 2} frequencies")
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or 2 * hidden,
                num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads or heads,
                max_position_embeddings=max_positions, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                 "mrope_section": list(mrope_section)}, tie_word_embeddings=False)
    vision = dict(depth=vision_layers, num_heads=vision_heads, patch_size=patch_size, spatial_merge_size=merge_size,
                  temporal_patch_size=2, in_channels=3)
    if family == "qwen2_vl":
        vision.update(embed_dim=vision_hidden, hidden_size=hidden, mlp_ratio=2)
    elif family == "qwen2_5_vl":
        vision.update(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, out_hidden_size=hidden,
                      window_size=window_size or 2 * patch_size * merge_size,
                      fullatt_block_indexes=list(fullatt_block_indexes))
    else:
        text.update(head_dim=head_dim, attention_bias=False)
        vision.update(hidden_size=vision_hidden, intermediate_size=2 * vision_hidden, out_hidden_size=hidden,
                      num_position_embeddings=64, deepstack_visual_indexes=list(deepstack_visual_indexes))
    config_class = getattr(transformers, f"{name}Config")
    text_class = getattr(transformers, f"{name}TextConfig")
    vision_class = getattr(transformers, f"{name}VisionConfig", None) or getattr(
        transformers.models, family).__dict__[f"configuration_{family}"].__dict__[f"{name}VisionConfig"]
    config = config_class(text_config=text_class(**text).to_dict(), vision_config=vision_class(**vision).to_dict(),
                          image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                          vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
                          tie_word_embeddings=False)
    return config


def tiny_qwen_vl(seed: int = 0, family: str = "qwen2_vl", **sizes):
    """A tiny random Qwen-VL of ``family`` (``"qwen2_vl"``, ``"qwen2_5_vl"``, ``"qwen3_vl"``) with its
    processor: 8 px patches (16 px per token after the 2 x 2 merge), 2 text layers, M-RoPE."""
    import transformers

    tokenizer = word_level_tokenizer(TINY_WORDS, special_tokens=QWEN_SPECIAL_TOKENS)
    patch_size = sizes.get("patch_size", 8)
    merge_size = sizes.get("merge_size", 2)
    processor = qwen_vl_processor(tokenizer, patch_size=patch_size, merge_size=merge_size,
                                  min_pixels=sizes.pop("min_pixels", None), max_pixels=sizes.pop("max_pixels", None),
                                  family=family)
    config = qwen_vl_config(tokenizer, family, **sizes)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = getattr(transformers, f"{QWEN_FAMILIES[family]}ForConditionalGeneration")(config)
    return model.eval(), processor


#: published sizes of released Qwen-VL checkpoints (their config.json / preprocessor_config.json), for
#: weightless real-scale models: geometry and memory checks without a download
QWEN_REFERENCE = {
    "Qwen/Qwen2-VL-2B-Instruct": dict(
        family="qwen2_vl",
        text=dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                  num_key_value_heads=2, rms_norm_eps=1e-6, max_position_embeddings=32768,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                  vocab_size=151936, tie_word_embeddings=True),
        vision=dict(depth=32, embed_dim=1280, mlp_ratio=4, num_heads=16, hidden_size=1536, patch_size=14,
                    spatial_merge_size=2, temporal_patch_size=2),
        processor=dict(patch_size=14, merge_size=2, min_pixels=3136, max_pixels=12845056)),
    "Qwen/Qwen2.5-VL-7B-Instruct": dict(
        family="qwen2_5_vl",
        text=dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                  num_key_value_heads=4, rms_norm_eps=1e-6, max_position_embeddings=128000,
                  rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
                  vocab_size=152064, tie_word_embeddings=False),
        vision=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                    patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                    fullatt_block_indexes=[7, 15, 23, 31], tokens_per_second=2, hidden_act="silu"),
        processor=dict(patch_size=14, merge_size=2, min_pixels=3136, max_pixels=12845056)),
    "Qwen/Qwen3-VL-8B-Instruct": dict(
        family="qwen3_vl",
        text=dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=262144,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                   "mrope_interleaved": True},
                  vocab_size=151936, attention_bias=False, tie_word_embeddings=False),
        vision=dict(depth=27, hidden_size=1152, intermediate_size=4304, num_heads=16, out_hidden_size=4096,
                    patch_size=16, spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=2304,
                    deepstack_visual_indexes=[8, 16, 24], hidden_act="gelu_pytorch_tanh"),
        processor=dict(patch_size=16, merge_size=2, min_pixels=65536, max_pixels=16777216,
                       image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))),
}


def qwen_vl_reference(name: str, *, device: str = "meta"):
    """``(model, processor)`` of a released Qwen-VL checkpoint's architecture (:data:`QWEN_REFERENCE`),
    weightless on ``device="meta"``, with its image processor's settings and a local word-level tokenizer
    (special-token ids are the local ones; every size and the geometry are the checkpoint's)."""
    import transformers

    if name not in QWEN_REFERENCE:
        raise ValueError(f"unknown reference {name!r}; choose one of {sorted(QWEN_REFERENCE)}")
    spec = QWEN_REFERENCE[name]
    family = spec["family"]
    tokenizer = word_level_tokenizer(TINY_WORDS, special_tokens=QWEN_SPECIAL_TOKENS)
    processor = qwen_vl_processor(tokenizer, family=family, **spec["processor"])
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIAL_TOKENS}
    prefix = QWEN_FAMILIES[family]
    text_class = getattr(transformers, f"{prefix}TextConfig")
    vision_class = getattr(getattr(transformers.models, family), f"configuration_{family}").__dict__[
        f"{prefix}VisionConfig"]
    config = getattr(transformers, f"{prefix}Config")(
        text_config=text_class(**spec["text"], pad_token_id=tokenizer.pad_token_id).to_dict(),
        vision_config=vision_class(**spec["vision"]).to_dict(),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=spec["text"]["tie_word_embeddings"])
    with torch.device(device):
        model = getattr(transformers, f"{prefix}ForConditionalGeneration")(config)
    return model.eval(), processor


GEMMA3_SPECIAL = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
#: a Gemma-like chat format (the real one's turn markers left out): ``user : <start_of_image> {question} model :``
GEMMA3_CHAT_TEMPLATE = role_chat_template("<start_of_image>", answer_role="model")


def gemma3_processor(tokenizer, image_size: int, tokens_per_image: int):
    """A ``Gemma3Processor``: the image stretched to ``image_size`` (no crop, no pan-and-scan),
    ``<start_of_image>`` expanded to ``tokens_per_image`` soft tokens and ``<end_of_image>``."""
    from transformers import Gemma3Processor

    image_processor = _image_processor_class("Gemma3ImageProcessor")(
        size={"height": image_size, "width": image_size}, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Gemma3Processor(image_processor=image_processor, tokenizer=tokenizer, chat_template=GEMMA3_CHAT_TEMPLATE,
                           image_seq_length=tokens_per_image)


def tiny_gemma3(seed: int = 0, *, image_size: int = 32, patch_size: int = 4, tokens_per_side: int = 4,
                hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2, sliding_window: int = 8,
                final_logit_softcapping: float | None = None):
    """A tiny random ``Gemma3ForConditionalGeneration`` with its processor: ``(model, processor)``.

    SigLIP on ``image_size`` px with ``patch_size`` px patches, pooled to ``tokens_per_side ** 2``
    image tokens; text layers alternate sliding (``sliding_window`` keys, shorter than the image) and
    global attention; every norm weight is randomised (Gemma initialises them at 0, gain 1), so the
    ``1 + weight`` gains and the sandwich norms matter.
    """
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    tokenizer = word_level_tokenizer((*TINY_WORDS, "model"), extra_special=GEMMA3_SPECIAL)
    processor = gemma3_processor(tokenizer, image_size, tokens_per_side ** 2)
    head_dim = hidden // heads
    text = Gemma3TextConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=head_dim, query_pre_attn_scalar=head_dim,
        sliding_window=sliding_window, layer_types=["sliding_attention" if i % 2 == 0 else "full_attention"
                                                   for i in range(layers)],
        vocab_size=len(tokenizer), max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        final_logit_softcapping=final_logit_softcapping, tie_word_embeddings=False)
    vision = SiglipVisionConfig(image_size=image_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
                                num_hidden_layers=2, num_attention_heads=2)
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in GEMMA3_SPECIAL.items()}
    config = Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=tokens_per_side ** 2,
                          image_token_index=ids["image_token"], boi_token_index=ids["boi_token"],
                          eoi_token_index=ids["eoi_token"], pad_token_id=tokenizer.pad_token_id,
                          tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Gemma3ForConditionalGeneration(config)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name and "language_model" in name or "mm_soft_emb_norm" in name:
                    parameter.normal_(0, 0.5)
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    return model.eval(), processor


INTERNVL_SPECIAL = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                    "video_token": "<video>"}
#: ``user : <image> {question} assistant :``, the processor expanding ``<IMG_CONTEXT>``
INTERNVL_CHAT_TEMPLATE = role_chat_template("<IMG_CONTEXT>")


def internvl_processor(tokenizer, tile_size: int, tokens_per_tile: int, max_tiles: int = 4):
    """An image-only ``InternVLProcessor``: GOT-OCR2 tiles of ``tile_size`` (1..``max_tiles`` of them,
    the grid closest to the image's aspect ratio, the image stretched onto it) plus a thumbnail when
    there are several; each tile gives ``tokens_per_tile`` ``<IMG_CONTEXT>`` tokens between
    ``<img>`` and ``</img>``."""
    from transformers import InternVLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyInternVLProcessor(InternVLProcessor):
        # transformers' constructor wants a video processor (torchvision); images need none
        def __init__(self, image_processor=None, tokenizer=None, image_seq_length=256, chat_template=None, **kwargs):
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)
            import re

            self.image_seq_length = image_seq_length
            self.start_image_token, self.end_image_token = tokenizer.start_image_token, tokenizer.end_image_token
            self.start_image_token_id = tokenizer.start_image_token_id
            self.end_image_token_id = tokenizer.end_image_token_id
            self.image_token, self.video_token = tokenizer.context_image_token, tokenizer.video_token
            self.image_token_id = tokenizer.context_image_token_id
            self.video_processor = None
            self.multimodal_pattern = re.compile(
                f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})")

    image_processor = _image_processor_class("GotOcr2ImageProcessor")(
        size={"height": tile_size, "width": tile_size}, crop_to_patches=True, min_patches=1, max_patches=max_tiles,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return ImageOnlyInternVLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                      image_seq_length=tokens_per_tile, chat_template=INTERNVL_CHAT_TEMPLATE)


def tiny_internvl(seed: int = 0, *, tile_size: int = 32, patch_size: int = 4, max_tiles: int = 4, hidden: int = 64,
                  layers: int = 2, heads: int = 4, kv_heads: int = 2):
    """A tiny random ``InternVLForConditionalGeneration`` (InternViT-like tower with a CLS token, pixel
    shuffle 0.5, Qwen2 text model) with its processor: ``(model, processor)``."""
    import transformers
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLVisionConfig

    tokenizer = word_level_tokenizer(TINY_WORDS, extra_special=INTERNVL_SPECIAL)
    tokens_per_tile = (tile_size // patch_size // 2) ** 2
    processor = internvl_processor(tokenizer, tile_size, tokens_per_tile, max_tiles)
    text = transformers.Qwen2Config(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=len(tokenizer), max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False)
    vision = InternVLVisionConfig(image_size=[tile_size, tile_size], patch_size=[patch_size, patch_size],
                                  hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5,
                            image_token_id=tokenizer.convert_tokens_to_ids(INTERNVL_SPECIAL["context_image_token"]),
                            image_seq_length=tokens_per_tile, pad_token_id=tokenizer.pad_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = InternVLForConditionalGeneration(config)
    return model.eval(), processor


IDEFICS3_SPECIAL = {"fake_image_token": "<fake_token_around_image>", "global_image_token": "<global-img>",
                    "end_of_utterance_token": "<end_of_utterance>",
                    **{f"row_{i}_col_{j}_token": f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)}}
#: ``user : <image> {question} assistant :``, the processor expanding ``<image>`` into tiles and markers
IDEFICS3_CHAT_TEMPLATE = role_chat_template("<image>")


def idefics3_processor(tokenizer, tile_size: int, tokens_per_tile: int, longest_edge: int):
    """An ``Idefics3Processor``: the image resized to ``longest_edge`` (aspect kept), stretched to
    multiples of ``tile_size``, cut into tiles (row-major) plus the whole image squashed to one tile;
    each tile's ``<image>`` tokens follow a ``<row_i_col_j>`` marker, the global image's ``<global-img>``."""
    from transformers import Idefics3Processor

    image_processor = _image_processor_class("Idefics3ImageProcessor")(
        size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile_size}, do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
    return Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer, image_seq_len=tokens_per_tile,
                             chat_template=IDEFICS3_CHAT_TEMPLATE)


def tiny_idefics3(seed: int = 0, *, tile_size: int = 32, patch_size: int = 4, scale_factor: int = 2,
                  longest_edge: int = 64, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    """A tiny random ``Idefics3ForConditionalGeneration`` (SigLIP-like tower, pixel shuffle in the connector,
    Llama text model) with its processor: ``(model, processor)``; up to 2 x 2 tiles plus the global image."""
    import transformers
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3VisionConfig

    tokenizer = word_level_tokenizer(TINY_WORDS, extra_special=IDEFICS3_SPECIAL)
    tokens_per_tile = (tile_size // patch_size // scale_factor) ** 2
    processor = idefics3_processor(tokenizer, tile_size, tokens_per_tile, longest_edge)
    text = transformers.LlamaConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, vocab_size=len(tokenizer), max_position_embeddings=1024,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False)
    vision = Idefics3VisionConfig(image_size=tile_size, patch_size=patch_size, hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=2)
    config = Idefics3Config(vision_config=vision, text_config=text, scale_factor=scale_factor,
                            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Idefics3ForConditionalGeneration(config)
    return model.eval(), processor


MISTRAL3_SPECIAL = {"image_token": "[IMG]", "image_break_token": "[IMG_BREAK]", "image_end_token": "[IMG_END]"}
#: ``user : [IMG] {question} assistant :``, the processor expanding ``[IMG]`` into rows closed by
#: ``[IMG_BREAK]`` and the last by ``[IMG_END]``
MISTRAL3_CHAT_TEMPLATE = role_chat_template("[IMG]")


def pixtral_processor_class():
    """transformers' own ``PixtralProcessor`` class, also where torchvision is not installed.

    Its module imports one helper, ``get_resize_output_image_size``, from the torchvision image processor
    module (only to count tokens); the PIL image processor module defines the same function. While the
    processor module is imported (once), the PIL one stands in for the torchvision one; the stand-in is
    removed right after, so nothing else sees it. With torchvision installed, the plain import runs.
    """
    import importlib
    import sys
    import types

    name = "transformers.models.pixtral.processing_pixtral"
    if name in sys.modules:
        return sys.modules[name].PixtralProcessor
    try:
        import torchvision  # noqa: F401
    except ImportError:
        from transformers.models.pixtral import image_processing_pil_pixtral as pil

        heavy = "transformers.models.pixtral.image_processing_pixtral"
        stand_in = types.ModuleType(heavy)
        stand_in.get_resize_output_image_size = pil.get_resize_output_image_size
        sys.modules[heavy] = stand_in
        try:
            return importlib.import_module(name).PixtralProcessor
        finally:
            if sys.modules.get(heavy) is stand_in:
                del sys.modules[heavy]
    return importlib.import_module(name).PixtralProcessor


def pixtral_processor(tokenizer, *, patch_size: int, spatial_merge_size: int, longest_edge: int,
                      chat_template: str | None = MISTRAL3_CHAT_TEMPLATE):
    """A ``PixtralProcessor`` with the PIL image processor (CLIP normalisation): the image resized to fit
    ``longest_edge`` (aspect kept, floored), then stretched to whole tokens of ``patch_size *
    spatial_merge_size`` px; ``[IMG]`` becomes one ``[IMG]`` per token, each row closed by ``[IMG_BREAK]``,
    the last by ``[IMG_END]``."""
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    image_processor = PixtralImageProcessorPil(size={"longest_edge": longest_edge},
                                               patch_size={"height": patch_size, "width": patch_size})
    return pixtral_processor_class()(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
                                     spatial_merge_size=spatial_merge_size, chat_template=chat_template)


def tiny_mistral3(seed: int = 0, *, patch_size: int = 4, spatial_merge_size: int = 2, longest_edge: int = 64,
                  hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2):
    """A tiny random ``Mistral3ForConditionalGeneration`` (Pixtral tower with 2D RoPE, RMS norm and patch
    merger in the projector, Mistral text model) with its processor: ``(model, processor)``. Images up to
    ``longest_edge`` px, one token per ``patch_size * spatial_merge_size`` px square."""
    import transformers
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, PixtralVisionConfig

    tokenizer = word_level_tokenizer(TINY_WORDS, extra_special=MISTRAL3_SPECIAL)
    processor = pixtral_processor(tokenizer, patch_size=patch_size, spatial_merge_size=spatial_merge_size,
                                  longest_edge=longest_edge)
    text = transformers.MistralConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
        num_key_value_heads=kv_heads, head_dim=hidden // heads, vocab_size=len(tokenizer), max_position_embeddings=1024,
        sliding_window=None, pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    vision = PixtralVisionConfig(image_size=longest_edge, patch_size=patch_size, hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=2, num_attention_heads=2)
    config = Mistral3Config(vision_config=vision, text_config=text, spatial_merge_size=spatial_merge_size,
                            image_token_index=tokenizer.convert_tokens_to_ids(MISTRAL3_SPECIAL["image_token"]),
                            pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = Mistral3ForConditionalGeneration(config)
        with torch.no_grad():  # initialised at 1: make the projector's norm gain matter
            model.model.multi_modal_projector.norm.weight.normal_(1, 0.5)
    return model.eval(), processor
