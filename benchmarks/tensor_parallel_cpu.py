"""Tensor parallelism (transformers' ``tp_plan="auto"``) on CPU with 2 gloo ranks: what each backend does.

Prints, per rank: the logits' largest difference from the unsharded model; the ``z`` capture of layer 0
as the hooks backend returns it (each rank holds 2 of the 4 heads; the capture layer gathers them,
:mod:`mech_vqa.tensor_parallel`) and its difference from the unsharded one; ``explain``'s head scores,
the logit lens and a head-ablation sweep against the unsharded model, with the time of ``explain``
on the sharded model over the unsharded one, and of a plain forward (medians of 7 interleaved rounds;
tiny model, so collectives' latency dominates); then the same on the nnsight backend (nnsight's own
gathering of sharded activations, in process): its ``explain`` head and position scores against the
unsharded model's and its time over the hooks backend's on the same sharded model.

    PYTHONPATH=. OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node 2 benchmarks/tensor_parallel_cpu.py

With ``--families``: every tiny layout the test suite builds, sharded the same way, with the largest
difference of its logits, ``explain`` (head, layer and position scores), logit lens and head ablations
(layer 0) from the unsharded model's.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist


def _seconds(sharded, whole, rounds: int = 7) -> tuple[float, float]:
    """Median seconds of ``sharded()`` and ``whole()``, called in interleaved rounds after one warm-up each
    (the machine is shared: interleaving spreads any slow spell over both)."""
    sharded(), whole()
    times: tuple[list, list] = ([], [])
    for _ in range(rounds):
        for fn, out in ((sharded, times[0]), (whole, times[1])):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(times[0]), statistics.median(times[1])


def main() -> None:
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from mech_vqa import VQAModel
    from mech_vqa.build import tiny_llava
    from mech_vqa.methods.ablation import ablate, head_ablations
    from mech_vqa.methods.logit_lens import logit_lens
    from mech_vqa.methods.mechanistic import explain

    torch.set_num_threads(1)
    model, processor = tiny_llava(seed=0, kv_heads=2)
    # one folder per rank, saved before the process group exists (transformers then saves on rank 0 only)
    folder = Path(tempfile.gettempdir()) / f"mech_vqa_tp_tiny_{os.environ.get('RANK', '0')}"
    model.save_pretrained(folder)
    sharded = AutoModelForImageTextToText.from_pretrained(folder, tp_plan="auto").eval()
    rank = dist.get_rank()
    ref, tp = VQAModel(model, processor), VQAModel(sharded, processor)
    image = Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype("uint8"))
    inp = ref.prepare(image, "What is the color of the dog?", "The dog is red.")
    local = sharded.model.language_model.layers[0].self_attn.o_proj.weight.to_local().shape[1] // ref.adapter.head_dim
    lines = [f"tp_size {sharded._tp_size}, this rank holds {local} of {ref.adapter.n_heads} heads per layer",
             f"logits vs unsharded: {(tp.logits(inp) - ref.logits(inp)).abs().max().item():.1e}"]
    with torch.no_grad(), tp.trace(["z"], layers=[0]) as got, ref.trace(["z"], layers=[0]) as expected:
        tp.forward(inp)
        ref.forward(inp)
    lines.append(f"hooks backend, z of layer 0: {tuple(got['z', 0].shape)} (whole: {ref.adapter.n_heads} heads x "
                 f"{ref.adapter.head_dim}), vs unsharded {(got['z', 0] - expected['z', 0]).abs().max().item():.1e}")
    a, b = explain(tp, inp, heads=2, progress=False), explain(ref, inp, heads=2, progress=False)
    lines.append(f"explain head scores vs unsharded: {(a.heads.scores - b.heads.scores).abs().max().item():.1e}, "
                 f"positions {(a.positions.scores - b.positions.scores).abs().max().item():.1e}")
    a, b = logit_lens(tp, inp, word="red", k=3), logit_lens(ref, inp, word="red", k=3)
    lines.append(f"logit lens top probs vs unsharded: {(a.top_probs - b.top_probs).abs().max().item():.1e}")
    a = ablate(tp, inp, head_ablations(tp), progress=False)
    b = ablate(ref, inp, head_ablations(ref), progress=False)
    lines.append(f"head ablation deltas vs unsharded: {(a.delta - b.delta).abs().max().item():.1e}")
    sharded_s, whole_s = _seconds(lambda: explain(tp, inp, heads=2, progress=False),
                                  lambda: explain(ref, inp, heads=2, progress=False))
    lines.append(f"explain time, sharded / unsharded: {sharded_s * 1e3:.1f} / {whole_s * 1e3:.1f} ms = "
                 f"{sharded_s / whole_s:.2f}x")
    sharded_s, whole_s = _seconds(lambda: tp.logits(inp), lambda: ref.logits(inp))
    lines.append(f"plain forward time, sharded / unsharded: {sharded_s * 1e3:.1f} / {whole_s * 1e3:.1f} ms = "
                 f"{sharded_s / whole_s:.2f}x (transformers' own cost of tensor parallelism here)")
    nn = VQAModel(sharded, processor, backend="nnsight")
    a, b = explain(nn, inp, heads=2, progress=False), explain(ref, inp, heads=2, progress=False)
    lines.append(f"nnsight backend, explain head scores vs unsharded: "
                 f"{(a.heads.scores - b.heads.scores).abs().max().item():.1e}, positions "
                 f"{(a.positions.scores - b.positions.scores).abs().max().item():.1e}")
    nn_s, hooks_s = _seconds(lambda: explain(nn, inp, heads=2, progress=False),
                             lambda: explain(tp, inp, heads=2, progress=False))
    lines.append(f"explain time on the sharded model, nnsight / hooks: {nn_s * 1e3:.1f} / {hooks_s * 1e3:.1f} ms = "
                 f"{nn_s / hooks_s:.2f}x")
    for line in lines:
        print(f"rank {rank}: {line}")
    sys.stdout.flush()
    dist.barrier()
    dist.destroy_process_group()


FAMILIES = {  # the tiny layouts of tests/conftest.py, same seeds
    "gqa": ("tiny_llava", {"seed": 0, "kv_heads": 2}),
    "mha": ("tiny_llava", {"seed": 1, "kv_heads": None, "layers": 3}),
    "mistral": ("tiny_llava", {"seed": 2, "kv_heads": 2, "text_model": "mistral", "sliding_window": 8}),
    "qwen2": ("tiny_llava", {"seed": 3, "kv_heads": 2, "text_model": "qwen2", "sliding_window": 8,
                             "vision_model": "siglip"}),
    "gemma": ("tiny_llava", {"seed": 7, "kv_heads": 2, "text_model": "gemma"}),
    "next": ("tiny_llava_next", {"seed": 5}),
    "onevision": ("tiny_llava_onevision", {"seed": 6}),
    "qwen2vl": ("tiny_qwen_vl", {"seed": 8, "family": "qwen2_vl"}),
    "qwen25vl": ("tiny_qwen_vl", {"seed": 9, "family": "qwen2_5_vl"}),
    "qwen3vl": ("tiny_qwen_vl", {"seed": 10, "family": "qwen3_vl"}),
    "gemma3": ("tiny_gemma3", {"seed": 8}),
    "internvl": ("tiny_internvl", {"seed": 10}),
    "idefics3": ("tiny_idefics3", {"seed": 11}),
    "mistral3": ("tiny_mistral3", {"seed": 12}),
}


def families() -> None:
    from PIL import Image
    from transformers import AutoModelForImageTextToText

    from mech_vqa import VQAModel, build
    from mech_vqa.methods.ablation import ablate, head_ablations
    from mech_vqa.methods.logit_lens import logit_lens
    from mech_vqa.methods.mechanistic import explain

    torch.set_num_threads(1)
    rank = int(os.environ.get("RANK", "0"))
    built = {name: getattr(build, builder)(**kwargs) for name, (builder, kwargs) in FAMILIES.items()}
    folders = {name: Path(tempfile.gettempdir()) / f"mech_vqa_tp_{name}_{rank}" for name in built}
    for name, (model, _) in built.items():   # before the process group exists (then only rank 0 would save)
        model.save_pretrained(folders[name])
    image = Image.fromarray((np.random.RandomState(0).rand(40, 48, 3) * 255).astype("uint8"))

    def gap(a, b) -> float:
        return (a.float() - b.float()).abs().max().item()

    for name, (model, processor) in built.items():
        sharded = AutoModelForImageTextToText.from_pretrained(folders[name], tp_plan="auto", dtype=model.dtype).eval()
        ref, tp = VQAModel(model, processor), VQAModel(sharded, processor)
        inp = ref.prepare(image, "What is the color of the dog?", "The dog is red.")
        a, b = explain(tp, inp, heads=2, progress=False), explain(ref, inp, heads=2, progress=False)
        lens = gap(logit_lens(tp, inp, word="red", k=3).top_probs, logit_lens(ref, inp, word="red", k=3).top_probs)
        ablation = gap(ablate(tp, inp, head_ablations(tp, layers=[0]), progress=False).delta,
                       ablate(ref, inp, head_ablations(ref, layers=[0]), progress=False).delta)
        explained = max(gap(a.heads.scores, b.heads.scores), gap(a.layers.attention, b.layers.attention),
                        gap(a.layers.mlp, b.layers.mlp), gap(a.positions.scores, b.positions.scores))
        sharded_params = sum(type(p).__name__ == "DTensor" for p in sharded.parameters())
        print(f"rank {rank}: {name:9s} {sharded_params:2d} sharded parameters; vs unsharded: logits "
              f"{gap(tp.logits(inp), ref.logits(inp)):.1e}, explain {explained:.1e}, logit lens {lens:.1e}, "
              f"head ablations {ablation:.1e}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    families() if "--families" in sys.argv[1:] else main()
