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
