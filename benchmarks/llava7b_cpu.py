"""Mechanistic attributions on a LLaVA-1.5-7B-shaped random model in bf16, on the CPU.

Issue 3 asks for the head-level ratio on this shape "when a GPU is lent"; none has been lent to this
project, so this script measures the same ratios on the CPU (bf16 matrix products run at ~360
GFLOP/s on the project's 2-core AVX-512-BF16 machine): head-level increases of all 32 x 32 heads
(forward included) and one head's position-level map against one plain forward, and the peak
resident-set rise of each against the plain forward's (glibc told to unmap every freed block of
64 KiB or more, so that a freed tensor leaves the resident set before the next measurement). Needs
~16 GB of free memory; one run of each path (a forward takes tens of seconds), so no medians.

Run: ``python benchmarks/llava7b_cpu.py``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, measured, midsize_input  # noqa: E402

from mech_vqa import VQAModel  # noqa: E402
from mech_vqa.build import TINY_WORDS, llava_processor, word_level_tokenizer  # noqa: E402
from mech_vqa.methods.mechanistic import capture_target, explain, layer_and_head_increase, position_increase  # noqa: E402,E501


def llava15_7b_shaped(vocab: int = 32064) -> VQAModel:
    """Random bf16 weights in LLaVA-1.5-7B's shapes: CLIP ViT-L/14-336 (24 layers, 1024 wide, feature
    layer -2), a 2-layer MLP projector, Llama-2-7B (32 layers, 4096 wide, 32 heads, MLP 11008)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    words = list(TINY_WORDS) + [f"w{i}" for i in range(vocab - len(TINY_WORDS) - 11)]
    tokenizer = word_level_tokenizer(words)
    processor = llava_processor(tokenizer, 336, 14)
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=len(tokenizer), max_position_embeddings=4096,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    vision = CLIPVisionConfig(image_size=336, patch_size=14, hidden_size=1024, intermediate_size=4096,
                              num_hidden_layers=24, num_attention_heads=16, projection_dim=768)
    config = LlavaConfig(text_config=text, vision_config=vision, vision_feature_layer=-2,
                         vision_feature_select_strategy="default", pad_token_id=tokenizer.pad_token_id,
                         image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # build the weights in bf16 directly (fp32 would need 28 GB)
    try:
        torch.manual_seed(0)
        model = LlavaForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    return VQAModel(model, processor, name="llava-1.5-7b-shaped-random-bf16")


def main() -> None:
    header("mechanistic attributions, LLaVA-1.5-7B shape, bf16, CPU")
    start = time.perf_counter()
    vqa = llava15_7b_shaped()
    print(f"model built in {time.perf_counter() - start:.0f} s: {vqa!r}")
    inp = midsize_input(vqa)
    print(f"sequence length {inp.seq_len} ({inp.image_positions.numel()} image tokens), target {inp.target()}")
    with torch.no_grad():
        vqa.forward(inp, logits_to_keep=1)  # warm-up
        runs = {
            "plain forward": lambda: vqa.logits(inp),
            "forward, last logits only": lambda: vqa.forward(inp, logits_to_keep=1),
            "head-level, all 32 x 32 (incl. forward)": lambda: layer_and_head_increase(
                capture_target(vqa, inp, kv_layers=None)),
        }
        results = {name: measured(fn) for name, fn in runs.items()}
        capture = capture_target(vqa, inp)
        top = results["head-level, all 32 x 32 (incl. forward)"][2][1][0].top_heads(1)
        results["position-level, one head (extra)"] = measured(lambda c=capture: position_increase(c, top))
        del capture
        results["explain(heads='top') total"] = measured(lambda: explain(vqa, inp, heads="top", progress=False))
    forward_time, forward_peak, _ = results["plain forward"]
    print("\none run each:")
    for name, (seconds, peak, _) in results.items():
        print(f"  {name:42s} {seconds:7.1f} s = {seconds / forward_time:5.2f}x forward | "
              f"peak rise {peak / 2**20:7.0f} MiB = {peak / forward_peak:4.2f}x forward's")
    head = results["head-level, all 32 x 32 (incl. forward)"][0]
    position = results["position-level, one head (extra)"][0]
    print(f"RESULT head_level_7b_cpu={head / forward_time:.2f}x (target <= 1.5), "
          f"position_level_7b_cpu={position / forward_time:.3f}x (target <= 0.2)")


if __name__ == "__main__":
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # re-run with freed memory returned to the OS
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0"))
    main()
