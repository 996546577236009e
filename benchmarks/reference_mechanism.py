"""``explain`` against the llava-mechanism notebook's own algorithm, side by side (issue 12, item 7).

The reference (Yu & Ananiadou 2024, zepingyu0512/llava-mechanism @dd4ed00; spec in
method-specs.md) as the notebook computes it, written here for transformers 5.x on the same weights:

* ONE forward of the prompt (which ends at the predicting position), eager attention returning its
  weights, the model patched to hand back each layer's input, attention output and FFN output at
  the last position and its values (here: forward hooks installed once, as the patched modeling
  files are, and never removed);
* the final norm frozen at the last layer's output ``r``: ``bsvalues(v) = lm_head(norm.weight * v *
  rsqrt(mean(r^2) + eps))`` (the notebook hard-codes eps = 1e-6; the model's own eps is used here so
  both sides compute the same function);
* per layer, ONE product with the unembedding: the rows ``x``, ``x + attn``, ``x + attn + ffn`` and
  ``x + h_j`` for every head ``j``, ``h_j = sum_p A_j[-1, p] V_j[p] @ W_O[j]`` (``W_O[j]`` the
  column block of o_proj), then a log-softmax over the vocabulary and the target's entry: head
  increase ``lp(x + h_j) - lp(x)``, layer increases ``lp(x + attn) - lp(x)`` and
  ``lp(x + attn + ffn) - lp(x + attn)``;
* for the top head, ONE product for all its source positions ``x + A_j[-1, p] V_j[p] @ W_O[j]``;
  the image positions laid on the patch grid are the heatmap (the notebook then min-max normalises
  it for display: :func:`display_heatmap`).

The target is the model's top token at the last position, as in the notebook. ``explain`` is run on
the identical prompt with that target (``Target(token, last position)``), so both compute the
same numbers; they are checked to agree before anything is timed. The notebook's ``.tolist()``
conversions and plots are left out (they would only slow the reference down).

Timing: each path over interleaved rounds (machine load hits all alike): the median wall time, the
median process CPU time (less disturbed by other processes on a shared machine) and the fastest
wall time, and ``explain``'s time over the reference's within each round (median, middle half of the
rounds, share of rounds at or under 1x: how much of a difference is the machine's), on the tiny 3-layer model (``tiny_llava(seed=1, kv_heads=None, layers=3)``, the tests'
``tiny_mha_vqa``) and on the mid-size model of ``common.py``, at the thread counts given (default 1
and 2; the mid-size model gets a quarter of the rounds). ``explain`` is also timed inside
``VQAModel.keep_hooks()`` (on a copy of the model): its capture's hooks installed once, as the
notebook's are, so neither side pays hook set-up per call. Also, on the tiny model, the forward
``explain`` runs with its capture set up and removed against a plain forward (target <= 1.3x).

    python benchmarks/reference_mechanism.py [--threads 1 2] [--repeats 31]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, midsize_vqa  # noqa: E402

from mech_vqa import VQAModel  # noqa: E402
from mech_vqa.inputs import Target  # noqa: E402
from mech_vqa.methods.mechanistic import explain, target_trace  # noqa: E402

QUESTION = "What is the color of the dog?"


@dataclass
class ReferenceResult:
    """The notebook's outputs: ``layers`` ``[L, 2]`` (attention, FFN), ``heads`` ``[L, H]``,
    ``top_head``, ``positions`` ``[S]`` of the top head, ``grid`` ``[rows, cols]`` the image part."""

    token_id: int
    layers: torch.Tensor
    heads: torch.Tensor
    top_head: tuple[int, int]
    positions: torch.Tensor
    grid: torch.Tensor


class ReferenceMechanism:
    """The llava-mechanism notebook on a HF LLaVA: a copy of the model, in eager attention, with
    the notebook's extra outputs wired in once (its patched modeling files, as hooks)."""

    def __init__(self, vqa):
        adapter = vqa.adapter
        self.model = copy.deepcopy(vqa.model).eval()
        self.model.set_attn_implementation("eager")  # the published code reads the attention weights
        # Module access through an adapter of the copy (paths live in one place); nothing of
        # mech_vqa's capture or scoring is used.
        self.adapter = type(adapter)(self.model)
        a = self.adapter
        self.n_layers, self.n_heads, self.n_kv, self.head_dim = a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim
        norm = a.final_norm
        self.norm_weight = norm.weight.detach()
        self.eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6)))
        self.lm_head = a.unembed.weight.detach()
        # W_O[j] = o_proj.weight[:, j*hd:(j+1)*hd].T, per layer [H, hd, d]
        self.W_O = [a.o_proj(layer).weight.detach().T.reshape(self.n_heads, self.head_dim, -1)
                    for layer in range(self.n_layers)]
        self.grid = a.patch_grid
        self.store: dict = {}
        for layer in range(self.n_layers):
            self._wire(layer)
        a.final_norm.register_forward_pre_hook(lambda m, args: self.store.__setitem__("final", args[0][0, -1]))

    def _wire(self, layer: int) -> None:
        a, store = self.adapter, self.store
        a.layer(layer).register_forward_pre_hook(
            lambda m, args, kwargs: store.__setitem__(("resid", layer), (args[0] if args else kwargs["hidden_states"])[0, -1]),
            with_kwargs=True)

        def attn(module, args, output):
            store["attn", layer] = output[0][0, -1]
            store["A", layer] = output[1][0, :, -1]  # [H, S]: the last query row of every head

        a.attn(layer).register_forward_hook(attn)
        a.v_proj(layer).register_forward_hook(lambda m, args, out: store.__setitem__(("v", layer), out[0]))
        a.mlp(layer).register_forward_hook(lambda m, args, out: store.__setitem__(("ffn", layer), out[0, -1]))

    @torch.no_grad()
    def __call__(self, inp, token_id: int | None = None) -> ReferenceResult:
        store = self.store
        store.clear()
        out = self.model(input_ids=inp.input_ids, attention_mask=inp.attention_mask,
                         pixel_values=inp.pixel_values.to(self.lm_head.dtype), use_cache=False, logits_to_keep=1)
        token_id = int(out.logits[0, -1].argmax()) if token_id is None else int(token_id)
        final = store["final"].float()
        scale = torch.rsqrt(final.pow(2).mean() + self.eps)
        W_U, gamma = self.lm_head.float(), self.norm_weight.float()

        def log_probs(vectors):  # [N, d] -> [N]: log softmax(bsvalues(v))[target]
            return (gamma * vectors * scale @ W_U.T).log_softmax(-1)[:, token_id]

        group = self.n_heads // self.n_kv
        layers, heads, subvalues = [], [], []
        for layer in range(self.n_layers):
            x, attn, ffn = store["resid", layer].float(), store["attn", layer].float(), store["ffn", layer].float()
            values = store["v", layer].float().view(-1, self.n_kv, self.head_dim).repeat_interleave(group, dim=1)
            sub = store["A", layer].float().T.unsqueeze(-1) * values  # [S, H, hd]: attn_subvalues
            head_vectors = torch.bmm(sub.sum(0).unsqueeze(1), self.W_O[layer].float())[:, 0]  # [H, d]
            rows = torch.cat([torch.stack([x, x + attn, x + attn + ffn]), x + head_vectors])
            lp = log_probs(rows)  # one product with the unembedding per layer
            layers.append(torch.stack([lp[1] - lp[0], lp[2] - lp[1]]))
            heads.append(lp[3:] - lp[0])
            subvalues.append(sub)
        heads = torch.stack(heads)
        top_layer, top_head = divmod(int(heads.argmax()), self.n_heads)
        x = store["resid", top_layer].float()
        per_position = subvalues[top_layer][:, top_head] @ self.W_O[top_layer][top_head].float()  # [S, d]
        lp = log_probs(torch.cat([x.unsqueeze(0), x + per_position]))  # one product for all positions
        positions = lp[1:] - lp[0]
        image = (inp.input_ids[0] == self.adapter.image_token_id).nonzero().flatten()
        grid = positions[image].view(self.grid)
        return ReferenceResult(token_id, torch.stack(layers), heads, (top_layer, top_head), positions, grid)


def display_heatmap(grid: torch.Tensor) -> torch.Tensor:
    """The notebook's display normalisation: min-max to [0, 1] (then cubic upsampling for the plot)."""
    return (grid - grid.min()) / (grid.max() - grid.min()).clamp_min(1e-12)


def prompt_and_target(vqa, reference: ReferenceMechanism, image):
    """The notebook's input (the prompt, ending where the answer starts) and its target."""
    inp = vqa.prepare(image, QUESTION, generate=False)
    token_id = reference(inp).token_id
    return inp, Target(token_id, inp.seq_len - 1, vqa.to_str_tokens([token_id])[0])


def check_same(vqa, reference: ReferenceMechanism, inp, target) -> dict:
    """Largest differences between the reference's numbers and ``explain``'s; raises if they disagree."""
    ours = explain(vqa, inp, target, progress=False)
    ref = reference(inp, target.token_id)
    top = ours.heads.top_heads(1)[0]
    if top != ref.top_head:
        raise AssertionError(f"top head differs: explain {top}, reference {ref.top_head}")
    diffs = {
        "layers": float((torch.stack([ours.layers.attention, ours.layers.mlp], 1) - ref.layers).abs().max()),
        "heads": float((ours.heads.scores - ref.heads).abs().max()),
        "positions": float((ours.positions.scores[0] - ref.positions).abs().max()),
        "grid": float((ours.patch_map.scores - ref.grid).abs().max()),
    }
    scale = max(1.0, float(ref.heads.abs().max()), float(ref.positions.abs().max()))
    bad = {k: v for k, v in diffs.items() if not v <= 1e-4 * scale}
    if bad:
        raise AssertionError(f"explain and the reference disagree: {bad}")
    return diffs


def interleaved(fns: dict, repeats: int, warmup: int = 3) -> dict:
    """Per path, over interleaved rounds (machine load hits every path alike): the median wall time,
    the median of this process's CPU time (what the call itself used: less sensitive to other
    processes on a shared machine, but it counts every thread's spinning too) and the fastest wall
    time (the least disturbed round)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    wall, cpu = {name: [] for name in fns}, {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            cpu[name].append(time.process_time() - start_cpu)
            wall[name].append(time.perf_counter() - start)
    return {"median wall": {k: statistics.median(v) for k, v in wall.items()},
            "median cpu": {k: statistics.median(v) for k, v in cpu.items()},
            "min wall": {k: min(v) for k, v in wall.items()},
            "rounds": wall}


def paired(rounds: dict, path: str, base: str) -> str:
    """``path``'s wall time over ``base``'s in the same round, over all rounds: the median, the middle
    half of the rounds and the share of rounds at or under 1 (how much of a difference is the machine's)."""
    ratios = sorted(a / b for a, b in zip(rounds[path], rounds[base]))
    quarter = len(ratios) // 4
    at_most_one = sum(r <= 1 for r in ratios) / len(ratios)
    return (f"median {statistics.median(ratios):.2f}x, middle half {ratios[quarter]:.2f}-{ratios[-quarter - 1]:.2f}x, "
            f"{at_most_one:.0%} of rounds <= 1x")


def tiny_vqa():
    """The tests' ``tiny_mha_vqa``: plain multi-head attention, three layers."""
    from mech_vqa.build import tiny_llava

    model, processor = tiny_llava(seed=1, kv_heads=None, layers=3)
    return VQAModel(model, processor, name="tiny-mha")


def run_model(name, vqa, image, thread_counts, repeats, captured_forward: bool) -> dict:
    reference = ReferenceMechanism(vqa)
    inp, target = prompt_and_target(vqa, reference, image)
    diffs = check_same(vqa, reference, inp, target)
    print(f"\n{name}: {vqa}\n  prompt of {inp.seq_len} tokens, target {target.token!r} at {target.position}; "
          f"max |explain - reference|: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    # explain in a keep_hooks block (its capture set up once, as the notebook's hooks are), on a copy of
    # the model so that the idle hooks touch no other path's forward
    kept = VQAModel(copy.deepcopy(vqa.model), vqa.processor, name=vqa.name)
    keeping = kept.keep_hooks()
    keeping.__enter__()
    fns = {
        "reference (notebook)": lambda: reference(inp, target.token_id),
        "explain(heads='top')": lambda: explain(vqa, inp, target, progress=False),
        "explain in keep_hooks": lambda: explain(kept, inp, target, progress=False),
    }
    if captured_forward:
        t, every_layer = torch.tensor([target.position]), list(range(vqa.adapter.n_layers))

        def plain():  # in the same grad mode as the captured one (inference mode: ~7 % faster than no_grad)
            with vqa.backend.read_only():
                vqa.forward(inp, logits_to_keep=1)

        def captured():  # the forward explain runs, with its capture set up and removed
            with target_trace(vqa, t, every_layer, mlp_act=False), vqa.backend.read_only():
                vqa.forward(inp, logits_to_keep=1)

        fns.update({"plain forward": plain, "captured forward": captured})
    results = {}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        stats = interleaved(fns, repeats)
        rounds = stats.pop("rounds")
        print(f"  {threads} thread(s), {repeats} interleaved rounds: median wall / median process CPU / min wall")
        for key in fns:
            print(f"    {key:24s} " + " / ".join(f"{stats[s][key] * 1e3:8.2f}" for s in stats) + " ms")
        for label, times in stats.items():
            ratio = times["explain(heads='top')"] / times["reference (notebook)"]
            kept_ratio = times["explain in keep_hooks"] / times["reference (notebook)"]
            line = (f"    RESULT {name} threads={threads} {label:11s}: explain/reference={ratio:.2f}x, "
                    f"in keep_hooks {kept_ratio:.2f}x")
            if captured_forward:
                line += f", captured/plain forward={times['captured forward'] / times['plain forward']:.2f}x"
            print(line)
        for path in ("explain(heads='top')", "explain in keep_hooks"):
            print(f"    RESULT {name} threads={threads} per round  : {path} / reference: "
                  + paired(rounds, path, "reference (notebook)"))
        results[threads] = stats
    keeping.__exit__(None, None, None)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=31)
    parser.add_argument("--models", nargs="+", default=["tiny", "midsize"], choices=["tiny", "midsize"])
    args = parser.parse_args()
    from PIL import Image

    torch.set_num_threads(args.threads[0])
    header("explain vs the llava-mechanism notebook's algorithm")
    image = Image.new("RGB", (32, 32), (200, 30, 30))
    if "tiny" in args.models:
        run_model("tiny", tiny_vqa(), image, args.threads, args.repeats, captured_forward=True)
    if "midsize" in args.models:
        import numpy as np

        rng = np.random.RandomState(0)
        mid_image = Image.fromarray((rng.rand(160, 160, 3) * 255).astype("uint8"))
        run_model("mid-size", midsize_vqa(), mid_image, args.threads, max(5, args.repeats // 4), captured_forward=False)


if __name__ == "__main__":
    main()
