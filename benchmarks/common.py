"""Shared pieces of the benchmarks: a mid-size random LLaVA and a median timer.

Not collected by pytest. Run a benchmark as ``python benchmarks/<name>.py``.
"""

from __future__ import annotations

import gc
import re
import statistics
import time
from pathlib import Path

import numpy as np
import torch


def midsize_vqa(vocab: int = 32000, hidden: int = 512, layers: int = 8, heads: int = 8, kv_heads: int = 4,
                image_size: int = 128, patch_size: int = 8, seed: int = 0):
    """A random LLaVA with hidden 512, 8 layers and a 16x16 = 256-token image (~290 tokens in all)."""
    from mech_vqa import VQAModel
    from mech_vqa.build import TINY_WORDS, llava_config, llava_processor, random_llava, word_level_tokenizer

    words = list(TINY_WORDS) + [f"w{i}" for i in range(vocab - len(TINY_WORDS) - 11)]
    tokenizer = word_level_tokenizer(words)
    processor = llava_processor(tokenizer, image_size, patch_size)
    config = llava_config(tokenizer, image_size=image_size, patch_size=patch_size, vision_hidden=128,
                          vision_layers=2, vision_heads=4, hidden=hidden, layers=layers, heads=heads,
                          kv_heads=kv_heads, intermediate=4 * hidden)
    return VQAModel(random_llava(config, seed=seed), processor, name="midsize-random")


def midsize_input(vqa, question="What is the color of the dog?", answer="The color of the dog is red."):
    from PIL import Image

    rng = np.random.RandomState(0)
    image = Image.fromarray((rng.rand(160, 160, 3) * 255).astype("uint8"))
    return vqa.prepare(image, question, answer)


def median_time(fn, repeats: int = 7, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` in seconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_medians(fns: dict, repeats: int = 7, warmup: int = 2) -> dict:
    """Median wall time of each function, timed in interleaved rounds so machine load hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def measured(fn):
    """``(seconds, peak resident-set rise in bytes, result)`` of one call of ``fn``.

    The rise is the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) above
    the resident set before the call. Linux only; run with glibc's ``MALLOC_MMAP_THRESHOLD_=65536``
    so that freed tensors leave the resident set.
    """
    gc.collect()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    start = time.perf_counter()
    result = fn()
    seconds = time.perf_counter() - start
    return seconds, _status("VmHWM") - before, result


def _status(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) * 1024


def header(title: str) -> None:
    print(f"== {title}  (torch {torch.__version__}, {torch.get_num_threads()} threads)")


# Sizes of the random LLaVA-1.5-shaped models built by ``llava_shaped``. ``llava-1.5-7b``: CLIP ViT-L/14-336
# (24 layers, 1024 wide, feature layer -2), a 2-layer MLP projector, Llama-2-7B (32 layers x 32 heads, 4096 wide,
# MLP 11008); 576 image tokens. ``mid``: the mid-size text model above behind a 2-layer CLIP (256 image tokens).
# ``tiny``: the test models' sizes (16 image tokens), for smoke runs.
LLAVA_SHAPES = {
    "llava-1.5-7b": dict(vocab=32064, image_size=336, patch_size=14, vision_hidden=1024, vision_intermediate=4096,
                         vision_layers=24, vision_heads=16, feature_layer=-2, hidden=4096, intermediate=11008,
                         layers=32, heads=32, kv_heads=32),
    "mid": dict(vocab=32000, image_size=128, patch_size=8, vision_hidden=128, vision_intermediate=256,
                vision_layers=2, vision_heads=4, feature_layer=-1, hidden=512, intermediate=2048, layers=8, heads=8,
                kv_heads=4),
    "tiny": dict(vocab=64, image_size=32, patch_size=8, vision_hidden=32, vision_intermediate=64, vision_layers=2,
                 vision_heads=2, feature_layer=-1, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2),
}


def llava_shaped(shape: str = "llava-1.5-7b", *, dtype: torch.dtype = torch.bfloat16, device="cpu", seed: int = 0):
    """A random LLaVA-1.5-style ``VQAModel`` in one of :data:`LLAVA_SHAPES`, built directly in ``dtype`` on
    ``device`` (a 7B model in fp32 on the CPU first would need 28 GB and minutes of initialisation)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from mech_vqa import VQAModel
    from mech_vqa.build import TINY_WORDS, llava_processor, word_level_tokenizer

    s = LLAVA_SHAPES[shape]
    words = list(TINY_WORDS) + [f"w{i}" for i in range(max(0, s["vocab"] - len(TINY_WORDS) - 11))]
    tokenizer = word_level_tokenizer(words)
    processor = llava_processor(tokenizer, s["image_size"], s["patch_size"])
    text = LlamaConfig(hidden_size=s["hidden"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
                       num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=len(tokenizer),
                       max_position_embeddings=4096, pad_token_id=tokenizer.pad_token_id,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       tie_word_embeddings=False)
    vision = CLIPVisionConfig(image_size=s["image_size"], patch_size=s["patch_size"], hidden_size=s["vision_hidden"],
                              intermediate_size=s["vision_intermediate"], num_hidden_layers=s["vision_layers"],
                              num_attention_heads=s["vision_heads"], projection_dim=768)
    config = LlavaConfig(text_config=text, vision_config=vision, vision_feature_layer=s["feature_layer"],
                         vision_feature_select_strategy="default", pad_token_id=tokenizer.pad_token_id,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.random.fork_rng(devices=[]), torch.device(device):
            torch.manual_seed(seed)
            model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return VQAModel(model, processor, name=f"{shape}-shaped-random-{str(dtype).removeprefix('torch.')}")
