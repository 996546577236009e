"""Issue 19 in one unattended run: every method on the target device, and the LLaVA-1.5-7B-shaped benchmarks.

Made for a GPU lent for minutes (``bash benchmarks/gpu.sh`` through the device tool; it must end within
8 minutes on one H200), and smoke-tested on the CPU (``--device cpu --small``). Two parts, each guarded
(an exception is recorded with its traceback and the run goes on), under one time budget:

1. **Correctness on the device** (``tiny_checks``): the tiny layouts of ``tests/conftest.py`` (LLaVA Llama
   GQA / MHA, Mistral sliding window, Qwen2 + SigLIP, Gemma, LLaVA-NeXT, LLaVA-OneVision), each method
   run four ways: on the CPU in fp32 (the reference), on the device in fp32 twice (must match the CPU
   within the CPU identity tests' tolerances, :data:`FP32_TOLERANCES`; the two device runs' difference
   is recorded: nonzero means a nondeterministic kernel), and on the device in bf16 and fp16 (no NaN /
   inf where fp32 is finite, and every score within :data:`HALF_TOLERANCES` of the device's fp32, scaled
   by the field's largest fp32 magnitude). The methods and the choices made for them are in :data:`METHODS`.
2. **Benchmarks** (``benchmark``): a random model in LLaVA-1.5-7B's shapes, bf16, on the device, 576 image
   tokens + a short question and answer (``--small``: the mid-size shape, in fp32 on the CPU, whose bf16
   matrix products run ~100x slower on CPUs without bf16 instructions; ``--tiny-only``: the tiny shape).
   Times (medians, the device synchronised inside each timed call) and peak memory of: a plain forward,
   capture of what ``explain`` needs, all heads' increases incl. the forward, one head's position map
   (extra, on a capture), ``explain(heads="top")``; as ratios to the plain forward. Then the head-ablation
   sweep of every head, batched, against one forward per head (timed on a subset, extrapolated linearly),
   and iGOS+ batched against the reference way (``benchmarks/igos.py``'s comparison) at equal AUCs, with
   the authors' README budget (``IGOSConfig()``: 5 iterations x 2 x 10 points, 2 % metric steps; ``--small``
   and ``--tiny-only``: 1 iteration x 2 x 4 points, 10 % steps). ``targets`` evaluates issue 19's targets.

Everything lands in ``OUT/gpu_results.json`` (rewritten after every step, so a killed run still leaves
what it measured; strict JSON: a value that would be NaN is null, its path and reason listed under
``nulls``). Peak memory: ``torch.cuda.max_memory_allocated`` (reset before each call) on a GPU; on the
CPU the rise of the resident set's peak (``common.measured``; the script re-runs itself with glibc told
to unmap freed blocks so that freed tensors leave the resident set).

Run: ``python benchmarks/gpu.py --device cuda --out OUT`` (GPU), ``python benchmarks/gpu.py --device cpu
--small --out /tmp/gpu_cpu`` (CPU smoke run, a few minutes), ``--tiny-only`` (seconds; the test).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import re
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # this checkout's mech_vqa, even if another is installed
from common import LLAVA_SHAPES, interleaved_medians, llava_shaped, measured, midsize_input  # noqa: E402

import mech_vqa  # noqa: E402
from mech_vqa import (  # noqa: E402
    VQAModel, ablate, causal_explanation, compare, explain, head_ablations, igos, insertion_deletion, logit_lens,
    neuron_increase, raw_attention_map, relevancy_map,
)
from mech_vqa.build import tiny_llava, tiny_llava_next, tiny_llava_onevision  # noqa: E402
from mech_vqa.methods.mechanistic import capture_target, layer_and_head_increase, position_increase  # noqa: E402
from mech_vqa.methods.token_selection import decode_tokens, is_content_text  # noqa: E402

RESULTS_NAME = "gpu_results.json"
QUESTION = "What is the color of the dog?"  # tests/conftest.py's question and answer
ANSWER = "The dog is red."

# fp32 on the device against fp32 on the CPU: (rtol, atol) as in torch.testing.assert_close,
# |device - cpu| <= atol + rtol |cpu|, taken from the CPU identity test of each method.
FP32_TOLERANCES = {
    "explain": (1e-4, 2e-5),                # tests/methods/test_mechanistic.py (log-prob increases)
    "neuron_increase": (1e-4, 2e-5),        # tests/methods/test_neurons.py
    "logit_lens": (1e-4, 1e-6),             # tests/methods/test_logit_lens.py (probabilities)
    "raw_attention_map": (0.0, 1e-6),       # tests/methods/test_raw_attention.py (attention weights)
    "relevancy_map": (1e-5, 1e-7),          # tests/methods/test_relevancy.py
    "causal_map": (0.0, 1e-5),              # tests/methods/test_causal.py (correlations); node sets exact
    "igos+": (0.0, 1e-5),                   # tests/methods/test_igos.py (masks)
    "igos++": (0.0, 1e-5),
    "insertion_deletion": (0.0, 1e-6),      # tests/metrics/test_insertion_deletion.py (raw curves)
    "head_ablation_sweep": (0.0, 1e-5),     # tests/methods/test_ablation.py (log-prob changes)
    "compare": (1e-4, 2e-5),                # every map above plus AUCs: the loosest of them
}
# bf16 / fp16 on the device against fp32 on the device: max |half - fp32| / max |fp32| per field.
# Unit roundoff is 2^-8 (bf16) and 2^-11 (fp16); a tiny model compounds it over ~10 rounded ops.
HALF_TOLERANCES = {"bfloat16": 0.1, "float16": 0.02}
# Fields whose value is a discrete choice made on rounded scores (a threshold or an argmax): in half
# precision a flip there is recorded, not failed (the fp32 check still requires them equal).
DISCRETE_CHOICES = ("nodes", "explanation", "kinds", "top_ids", "top_neurons", "ablated_argmax", "flipped",
                    "adjacency", "causal")
# Quantities derived from a small difference, recorded (``derived_max_abs_diff``) but not failed: normalised
# deletion / insertion curves and their AUCs divide by s(I) - s(B), which random weights make tiny; rank
# correlations of nearly flat maps; token-selection gaps log p(I) - log p(B); iGOS's objective D - Ins + R;
# knock-out drops log p(clean) - log p(knocked out) and their excess over random cells (a random model barely
# reacts to a few zeroed tokens), and the head-claims rank correlation.
# What they are computed from (raw probability curves, maps, log-probs, each term) is checked.
ILL_CONDITIONED = re.compile(r"(auc$|\.correlations\.|\.(deletion|insertion)$|_curve$|\.gap$|\.objective$"
                             r"|\.(drop|random|excess)_[a-z]+@|\.spearman$|log_gap$)")
SKIP_FIELDS = {"info", "timings", "runtime_s", "image", "params", "promoted", "str_tokens", "top_tokens"}


# ----------------------------------------------------------------------------------------- budget
class BudgetExceeded(BaseException):
    """Raised by SIGALRM at the deadline. A BaseException, so that no ``except Exception`` swallows it."""


class Stopped(BaseException):
    """Raised by SIGTERM / SIGINT (gpu.sh's ``timeout``, or a person): what was measured is still written."""


def stop_on_signals() -> None:
    def handler(signum, frame):
        raise Stopped(f"signal {signal.Signals(signum).name}")

    for sig in (signal.SIGTERM, signal.SIGINT):  # also where the shell started us with SIGINT ignored
        signal.signal(sig, handler)


class Budget:
    def __init__(self, seconds: float):
        self.seconds = seconds
        self.start = time.monotonic()
        self.deadline = self.start + seconds
        self.expired = False

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def arm(self) -> None:
        def handler(signum, frame):
            self.expired = True
            raise BudgetExceeded(f"time budget of {self.seconds:.0f} s spent")

        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.01))

    def disarm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)


# ------------------------------------------------------------------------------------------ JSON
class Report:
    """The results dict, written to disk (atomically, strict JSON) after every step."""

    def __init__(self, path: Path, data: dict):
        self.path, self.data = path, data

    def write(self) -> None:
        nulls = []
        clean = _strict(self.data, "", nulls)
        clean["nulls"] = self.data.get("nulls", []) + nulls
        text = json.dumps(clean, indent=1, allow_nan=False)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.path)


def _strict(value, path, nulls):
    """A copy of ``value`` with every non-finite float made null (its path and reason kept in ``nulls``)."""
    if isinstance(value, dict):
        return {str(k): _strict(v, f"{path}.{k}" if path else str(k), nulls) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(v, f"{path}[{i}]", nulls) for i, v in enumerate(value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            nulls.append({"path": path, "reason": f"non-finite value ({value})"})
            return None
        return float(value)
    if value is None or isinstance(value, str):
        return value
    if torch.is_tensor(value):
        return _strict(value.tolist(), path, nulls)
    return str(value)


def guarded(record: dict, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``; an exception is recorded in ``record`` (status, error, traceback) instead."""
    try:
        return fn(*args, **kwargs)
    except BudgetExceeded as err:
        record.update(status="skipped", reason=f"{err} (stopped while running)")
    except Exception as err:  # noqa: BLE001 - every failure is a finding to record, then the run goes on
        record.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc())
    return None


def log(budget: Budget, message: str) -> None:
    print(f"[{budget.elapsed():6.1f} s] {message}", flush=True)


# ------------------------------------------------------------------------------------ environment
def environment(device: torch.device) -> dict:
    import transformers

    env = {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "transformers": transformers.__version__,
        "mech_vqa": mech_vqa.__version__, "torch_threads": torch.get_num_threads(), "device": str(device),
        "device_name": "cpu", "cuda_available": torch.cuda.is_available(),
    }
    try:
        env["git_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                           cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip() or None
    except Exception:  # noqa: BLE001 - no git on the machine: the commit is simply unknown
        env["git_commit"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=torch.cuda.get_device_name(device), device_memory_bytes=props.total_memory,
                   multiprocessors=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   cudnn=torch.backends.cudnn.version(),
                   matmul_tf32=torch.backends.cuda.matmul.allow_tf32, cudnn_tf32=torch.backends.cudnn.allow_tf32)
    return env


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ================================================================================ part 1: methods
def tiny_layouts() -> dict:
    """Builders of the tiny layouts: the same seeds and options as tests/conftest.py's fixtures."""

    def gemma():
        model, processor = tiny_llava(seed=7, kv_heads=2, text_model="gemma")
        generator = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if "norm" in name:  # Gemma initialises its norm weights at 0 (gain 1): randomise so that it matters
                    parameter.normal_(0, 0.5, generator=generator)
        return model, processor

    # the most different layouts first, so that a budget cut leaves out the ones most like those already run
    return {
        "gqa": lambda: tiny_llava(seed=0, kv_heads=2),
        "next": lambda: tiny_llava_next(seed=5),
        "onevision": lambda: tiny_llava_onevision(seed=6),
        "qwen2": lambda: tiny_llava(seed=3, kv_heads=2, text_model="qwen2", sliding_window=8, vision_model="siglip"),
        "gemma": gemma,
        "mistral": lambda: tiny_llava(seed=2, kv_heads=2, text_model="mistral", sliding_window=8),
        "mha": lambda: tiny_llava(seed=1, kv_heads=None, layers=3),
    }


def test_image():
    from PIL import Image

    rng = np.random.RandomState(0)
    return Image.fromarray((rng.rand(40, 48, 3) * 255).astype("uint8"))  # tests/conftest.py's ``image``


def answer_word_index(vqa, inp) -> int:
    """The last content token of the answer ("red"): on random weights no token passes iGOS's selection
    threshold reliably, so every method is given this one by hand (as benchmarks/igos.py does)."""
    words = decode_tokens(vqa.tokenizer, inp.input_ids[0, inp.answer_positions].tolist())
    return max(i for i, w in enumerate(words) if is_content_text(w))


def small_igos(two_masks: bool | None = None) -> dict:
    # noise_std=0: the noise is drawn by the device's own generator (CPU and CUDA streams differ for one
    # seed), so only the noiseless optimisation can be compared across devices. l1 = 0 and lr = 3 (as in
    # tests/methods/test_igos.py) keep a random model's small gradients from being clamped away: the mask moves.
    config = dict(mask_size=4, iterations=2, n_steps=3, noise_std=0.0, l1=0.0, lr=3.0)
    return config if two_masks is None else {**config, "two_masks": two_masks}


# Each method: ``run(vqa, inp, choice) -> result``. ``choice`` holds what the CPU fp32 run fixed for all
# runs of the layout, so that every run explains the same thing: the answer token, the explained head
# (a near-tie in "top" would otherwise compare different heads) and the saliency scored by the metric.
METHODS = {
    "explain": lambda vqa, inp, c: explain(vqa, inp, inp.target(c["word"]), heads=[c["head"]], progress=False),
    "neuron_increase": lambda vqa, inp, c: neuron_increase(vqa, inp, inp.target(c["word"]), progress=False),
    "logit_lens": lambda vqa, inp, c: logit_lens(vqa, inp, "red", k=3),
    "raw_attention_map": lambda vqa, inp, c: raw_attention_map(vqa, inp, [inp.target(c["word"])]),
    "relevancy_map": lambda vqa, inp, c: relevancy_map(vqa, inp, [inp.target(c["word"])], progress=False),
    "causal_map": lambda vqa, inp, c: _causal(vqa, inp, c),
    "igos+": lambda vqa, inp, c: igos(vqa, inp, tokens=[c["word"]], progress=False, step_fraction=0.25,
                                      **small_igos(False)),
    "igos++": lambda vqa, inp, c: igos(vqa, inp, tokens=[c["word"]], progress=False, step_fraction=0.25,
                                       **small_igos(True)),
    "insertion_deletion": lambda vqa, inp, c: insertion_deletion(vqa, inp, c["saliency"], tokens=[c["word"]],
                                                                 step_fraction=0.1, progress=False),
    "head_ablation_sweep": lambda vqa, inp, c: ablate(vqa, inp, head_ablations(vqa), progress=False),
    "compare": lambda vqa, inp, c: compare(vqa, inp, tokens=[c["word"]], step_fraction=0.25, progress=False,
                                           options={"igos": small_igos()}),  # igos+ / igos++ set the masks
}


def _causal(vqa, inp, choice):
    explanation = causal_explanation(vqa, inp, inp.target(choice["word"]), head=choice["head"][1])
    return {"explanation": explanation, "causal_map": explanation.patch_map()}


def leaves(value, prefix: str = "") -> dict:
    """Every tensor and float inside a result (dataclass fields, dicts, lists), by path; metadata skipped."""
    out = {}
    if torch.is_tensor(value):
        out[prefix] = value.detach().cpu()
    elif dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            if field.name not in SKIP_FIELDS:
                out.update(leaves(getattr(value, field.name), f"{prefix}.{field.name}"))
    elif isinstance(value, dict):
        for key, item in value.items():
            if key not in SKIP_FIELDS:
                out.update(leaves(item, f"{prefix}.{key}"))
    elif isinstance(value, (list, tuple)):
        if value and all(isinstance(v, float) for v in value):
            out[prefix] = torch.tensor(value, dtype=torch.float64)
        else:
            for i, item in enumerate(value):
                out.update(leaves(item, f"{prefix}[{i}]"))
    elif isinstance(value, float):
        out[prefix] = torch.tensor(value, dtype=torch.float64)
    return out


def compare_results(got, ref, *, rtol: float = 0.0, atol: float = 0.0, scaled: float | None = None) -> dict:
    """Compare two results field by field.

    Exact mode (``scaled`` None): every float field within ``atol + rtol |ref|``, every discrete field
    (ints, bools) equal, shapes equal. Scaled mode (half precision): every float field's
    ``max |got - ref| / max |ref|`` at most ``scaled``; discrete choices (:data:`DISCRETE_CHOICES`) may
    differ (recorded). Both: no NaN / inf in ``got`` where ``ref`` is finite.
    """
    a, b = leaves(got), leaves(ref)
    record = {"fields": len(b), "max_abs_diff": 0.0, "worst_field": None, "derived_max_abs_diff": 0.0,
              "nonfinite": [], "mismatched": [], "discrete_flips": []}
    if scaled is not None:
        record["max_scaled_diff"] = 0.0
    if set(a) != set(b):
        record["mismatched"].append(f"fields differ: {sorted(set(a) ^ set(b))[:5]}")
    worst = -1.0
    for name in sorted(set(a) & set(b)):
        x, y = a[name], b[name]
        discrete = not (y.is_floating_point() or y.is_complex())
        choice = scaled is not None and any(key in name for key in DISCRETE_CHOICES)
        if x.shape != y.shape:
            (record["discrete_flips"] if choice else record["mismatched"]).append(
                f"{name}: shape {tuple(x.shape)} vs {tuple(y.shape)}")
            continue
        if discrete:
            if not torch.equal(x, y):
                (record["discrete_flips"] if choice else record["mismatched"]).append(
                    f"{name}: {int((x != y).sum())} of {y.numel()} differ")
            continue
        x, y = x.double(), y.double()
        finite = torch.isfinite(y)
        if (~torch.isfinite(x) & finite).any():
            record["nonfinite"].append(f"{name}: {int((~torch.isfinite(x) & finite).sum())} non-finite")
        if ((torch.isnan(x) != torch.isnan(y)) & ~finite).any():  # NaN in the reference must stay NaN
            record["mismatched"].append(f"{name}: NaN pattern differs")
        if not finite.any():
            continue
        diff = (x - y).abs()[finite & torch.isfinite(x)]
        max_diff = float(diff.max()) if diff.numel() else 0.0
        if ILL_CONDITIONED.search(name):
            record["derived_max_abs_diff"] = max(record["derived_max_abs_diff"], max_diff)
            continue
        if max_diff > record["max_abs_diff"]:
            record["max_abs_diff"] = max_diff
        if scaled is None:
            excess = float(((x - y).abs() - (atol + rtol * y.abs()))[finite].max())
            if excess > 0:
                record["mismatched"].append(f"{name}: max |diff| {max_diff:.3g} over tolerance")
            score = max_diff
        else:
            scale = float(y[finite].abs().max())
            relative = max_diff / scale if scale > 0 else (0.0 if max_diff == 0 else math.inf)
            record["max_scaled_diff"] = max(record["max_scaled_diff"], relative)
            if relative > scaled and not choice:
                record["mismatched"].append(f"{name}: max |diff| / max |fp32| = {relative:.3g}")
            score = relative
        if score > worst:
            worst, record["worst_field"] = score, name
    record["passed"] = not record["mismatched"] and not record["nonfinite"]
    for key in ("mismatched", "nonfinite", "discrete_flips"):
        record[key] = record[key][:8]  # the first few are enough to find the problem
    return record


def timed_run(fn, device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def check_layout(name: str, build, device: torch.device, dtypes: list[str], methods: list[str], budget: Budget,
                 report: Report, checks: list) -> None:
    """Every method on one layout: CPU fp32 reference, device fp32 twice, device bf16 / fp16."""
    image = test_image()
    model, processor = build()
    cpu = VQAModel(model, processor, name=f"tiny-{name}")
    inp = cpu.prepare(image, QUESTION, ANSWER)
    word = answer_word_index(cpu, inp)
    head_scores = layer_and_head_increase(capture_target(cpu, inp, inp.target(word), kv_layers=None))[1][0]
    head = tuple(head_scores.top_heads(1)[0])
    choice = {"word": word, "head": head, "saliency": raw_attention_map(cpu, inp, [inp.target(word)]).scores}
    log(budget, f"layout {name}: {cpu!r}, {inp.seq_len} tokens, target {inp.target(word)}, head {head}")

    variants = {}
    for dtype_name in ["float32", *dtypes]:
        dtype = getattr(torch, dtype_name)
        variants[dtype_name] = VQAModel(copy.deepcopy(model).to(device=device, dtype=dtype), processor,
                                        name=f"tiny-{name}-{dtype_name}")
    for method in methods:
        if budget.expired:
            raise BudgetExceeded("time budget spent")
        run = METHODS[method]
        rtol, atol = FP32_TOLERANCES[method]
        base = {"layout": name, "method": method}
        reference = {}
        ref = guarded(reference, lambda: timed_run(lambda: run(cpu, inp, choice), torch.device("cpu")))
        if ref is None:
            checks.append({**base, "dtype": "float32", "against": "cpu float32", "passed": False,
                           "stage": "cpu reference", **reference})
            continue
        ref, cpu_seconds = ref
        if hasattr(ref, "mask"):  # iGOS: show that the compared mask was optimised, not left at its start (ones)
            base["cpu_mask_min"] = float(ref.mask.min())
        device_fp32 = None
        for dtype_name, vqa in variants.items():
            record = {**base, "dtype": dtype_name, "device": str(device)}
            if dtype_name == "float32":
                record.update(against="cpu float32", rtol=rtol, atol=atol, cpu_seconds=cpu_seconds)
            else:
                record.update(against=f"{device} float32", scaled_tolerance=HALF_TOLERANCES[dtype_name])

            def one(vqa=vqa, dtype_name=dtype_name, record=record):
                nonlocal device_fp32
                got, seconds = timed_run(lambda: run(vqa, inp, choice), device)
                record["seconds"] = seconds
                if dtype_name == "float32":
                    again, _ = timed_run(lambda: run(vqa, inp, choice), device)
                    repeat = compare_results(again, got)
                    record["repeat_max_abs_diff"] = repeat["max_abs_diff"]
                    record["repeat_identical"] = repeat["passed"] and repeat["max_abs_diff"] == 0.0
                    device_fp32 = got
                    record.update(compare_results(got, ref, rtol=rtol, atol=atol))
                elif device_fp32 is None:
                    raise RuntimeError(f"no {device} float32 result to compare with (its run failed)")
                else:
                    record.update(compare_results(got, device_fp32, scaled=HALF_TOLERANCES[dtype_name]))

            guarded(record, one)
            record.setdefault("passed", False)
            checks.append(record)
            flag = "ok  " if record["passed"] else "FAIL"
            detail = record.get("error") or record.get("reason") or (
                f"max|diff| {record.get('max_abs_diff', float('nan')):.2e}"
                + (f" scaled {record['max_scaled_diff']:.2e}" if "max_scaled_diff" in record else "")
                + (f" {record['mismatched'][:1]}" if record.get("mismatched") else "")
                + (f" nonfinite {record['nonfinite'][:1]}" if record.get("nonfinite") else ""))
            log(budget, f"  {flag} {name:9s} {method:19s} {dtype_name:8s} {detail}")
            if budget.expired:
                raise BudgetExceeded("time budget spent")
        report.write()
    del variants
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_tiny_checks(args, device, budget: Budget, report: Report) -> None:
    section = report.data["tiny_checks"]
    section.update(status="running", layouts=args.layouts, methods=args.methods, dtypes=args.dtypes,
                   fp32_tolerances={k: {"rtol": r, "atol": a} for k, (r, a) in FP32_TOLERANCES.items()},
                   half_tolerances=HALF_TOLERANCES, checks=[], layout_errors=[],
                   notes=["iGOS runs noiseless (noise_std=0) with 2 iterations x 3 points on a 4 x 4 mask: its noise "
                          "comes from the device's own generator, so noisy runs differ across devices by design",
                          "every run explains the answer word 'red' and the head the CPU fp32 run ranks first",
                          "half precision: discrete choices (causal node sets, top-k ids, argmaxes) may flip; "
                          "flips are listed under discrete_flips and do not fail the check"])
    layouts = tiny_layouts()
    cap = budget.left() * args.tiny_share
    start = time.monotonic()
    for name in args.layouts:
        used = time.monotonic() - start
        if budget.expired:
            section["layout_errors"].append({"layout": name, "status": "skipped", "reason": "time budget spent"})
            continue
        if used > cap:
            section["layout_errors"].append({"layout": name, "status": "skipped",
                                             "reason": f"part 1's share of the budget ({cap:.0f} s) spent"})
            continue
        record = {"layout": name}
        guarded(record, check_layout, name, layouts[name], device, args.dtypes, args.methods, budget, report,
                section["checks"])
        if "status" in record:
            section["layout_errors"].append(record)
            log(budget, f"layout {name}: {record['status']}: {record.get('error') or record.get('reason')}")
        report.write()
    checks = section["checks"]
    section["summary"] = {"checks": len(checks), "passed": sum(c["passed"] for c in checks),
                          "failed": [f"{c['layout']}/{c['method']}/{c['dtype']}" for c in checks
                                     if not c["passed"] and c.get("status") != "skipped"],
                          "cut_by_budget": [f"{c['layout']}/{c['method']}/{c['dtype']}" for c in checks
                                            if c.get("status") == "skipped"],
                          "nondeterministic": [f"{c['layout']}/{c['method']}" for c in checks
                                               if c.get("repeat_identical") is False]}
    section["status"] = "done" if not section["layout_errors"] else "partial"
    report.write()


# ============================================================================= part 2: benchmarks
def peak_of(fn, device):
    """``(peak bytes above the memory in use before the call, absolute peak or None, result)``."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        result = fn()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        return peak - before, peak, result
    _, rise, result = measured(fn)
    return rise, None, result


def bench_timings(stages: dict, fns: dict, device, repeats: int, warmup: int) -> None:
    def synced(fn):
        return lambda: (fn(), synchronize(device))

    medians = interleaved_medians({name: synced(fn) for name, fn in fns.items()}, repeats=repeats, warmup=warmup)
    forward = medians["forward"]
    for name, seconds in medians.items():
        stages[name].update(seconds=seconds, ratio_to_forward=seconds / forward, repeats=repeats, status="ok")


def run_benchmark(args, device, budget: Budget, report: Report) -> None:
    section = report.data["benchmark"]
    stages = section["stages"]
    shape = args.bench_shape
    dtype = getattr(torch, args.bench_dtype)
    section.update(status="running", shape=shape, sizes=LLAVA_SHAPES[shape], dtype=args.bench_dtype)
    vqa, build_seconds = timed_run(lambda: llava_shaped(shape, dtype=dtype, device=device), device)
    inp = midsize_input(vqa)
    word = answer_word_index(vqa, inp)
    a = vqa.adapter
    section["model"] = {"name": vqa.name, "repr": repr(vqa), "build_seconds": build_seconds,
                        "parameters": sum(p.numel() for p in vqa.model.parameters()), "seq_len": inp.seq_len,
                        "image_tokens": int(inp.image_positions.numel()),
                        "answer_tokens": int(inp.answer_positions.numel()), "heads_total": a.n_layers * a.n_heads,
                        "target": inp.target().to_dict()}
    log(budget, f"benchmark model {vqa!r} built in {build_seconds:.1f} s; {inp.seq_len} tokens")
    report.write()

    with torch.no_grad():
        for _ in range(2):  # warm-up: kernels chosen, allocator filled
            vqa.forward(inp, logits_to_keep=1)
        synchronize(device)
        capture = capture_target(vqa, inp)
        top = layer_and_head_increase(capture)[1][0].top_heads(1)
        section["model"]["top_head"] = list(top[0])
        fns = {
            "forward": lambda: vqa.logits(inp),
            "forward_last_logits": lambda: vqa.forward(inp, logits_to_keep=1),
            "capture": lambda: capture_target(vqa, inp),
            "all_heads_increase": lambda: layer_and_head_increase(capture_target(vqa, inp, kv_layers=None)),
            "one_head_positions": lambda: position_increase(capture, top),
            "explain": lambda: explain(vqa, inp, heads="top", progress=False),
        }
        descriptions = {
            "forward": "plain forward, full logits (vqa.logits)",
            "forward_last_logits": "forward, last position's logits only",
            "capture": "capture_target(vqa, inp): what explain needs at the target, every layer's keys/values",
            "all_heads_increase": "layer_and_head_increase(capture_target(kv_layers=None)): all heads, forward incl.",
            "one_head_positions": "position_increase(capture, top head): extra cost on a capture",
            "explain": "explain(vqa, inp, heads='top'): all levels, top head's position map",
        }
        for name, text in descriptions.items():
            stages[name] = {"what": text, "status": "pending"}
        timing_record = {}
        guarded(timing_record, bench_timings, stages, fns, device, args.repeats, 1)
        if timing_record:
            for name in fns:
                stages[name].update(timing_record)
        log(budget, "timings: " + ", ".join(f"{n} {s.get('seconds', float('nan')) * 1e3:.1f} ms"
                                            for n, s in stages.items() if n in fns))
        report.write()

        # peak memory, each path once (after the warm-up above)
        for name, fn in fns.items():
            record = stages[name]

            def memory(fn=fn, record=record):
                rise, peak, result = peak_of(fn, device)
                del result
                record.update(peak_rise_bytes=rise, peak_bytes=peak)

            failure = {}
            guarded(failure, memory)
            if failure:
                record.update(peak_rise_bytes=None, memory_error=failure.get("error") or failure.get("reason"),
                              memory_traceback=failure.get("traceback"))
        forward_rise = stages["forward"].get("peak_rise_bytes")
        for name in fns:
            rise = stages[name].get("peak_rise_bytes")
            ratio = rise / forward_rise if rise is not None and forward_rise else None
            stages[name]["peak_rise_ratio_to_forward"] = ratio
            if stages[name]["peak_rise_ratio_to_forward"] is None:
                stages[name]["peak_rise_ratio_null_because"] = (
                    "this path's peak was not measured" if rise is None else
                    "the plain forward's peak rise was not measured" if forward_rise is None else
                    "the plain forward raised the peak by 0 bytes (too small a model to see)")
        section["memory_note"] = (
            "peak_rise_bytes: peak of torch.cuda.max_memory_allocated (reset before the call) minus the memory in use "
            "before it (weights, and for one_head_positions the capture)" if device.type == "cuda" else
            "peak_rise_bytes: rise of the process's peak resident set (VmHWM) above the resident set before the call "
            "(common.measured; glibc unmaps freed blocks of 64 KiB or more)")
        log(budget, "peak rise: " + ", ".join(f"{n} {(s.get('peak_rise_bytes') or 0) / 2**20:.0f} MiB"
                                              for n, s in stages.items() if n in fns))
        del capture
        report.write()

    if budget.left() > 5:
        stages["head_ablation_sweep"] = record = {"status": "running"}
        guarded(record, bench_sweep, vqa, inp, device, args, budget, record, stages["forward"].get("seconds"))
        if record["status"] == "running":
            record["status"] = "ok"
        report.write()
    else:
        stages["head_ablation_sweep"] = {"status": "skipped", "reason": "time budget spent"}
    if budget.left() > 5:
        stages["igos"] = record = {"status": "running"}
        guarded(record, bench_igos, vqa, inp, word, args, budget, record)
        if record["status"] == "running":
            record["status"] = "ok"
        report.write()
    else:
        stages["igos"] = {"status": "skipped", "reason": "time budget spent"}
    section["targets"] = targets(stages, shape, device)
    section["status"] = "done"
    report.write()


def bench_sweep(vqa, inp, device, args, budget, record, forward_seconds) -> None:
    from ablation import naive_sweep  # benchmarks/ablation.py: one full forward per head

    ablations = head_ablations(vqa)
    record.update(heads=len(ablations), batch_size=args.sweep_batch, answer_tokens=int(inp.answer_positions.numel()))
    ablate(vqa, inp, ablations[:args.sweep_batch], batch_size=args.sweep_batch, progress=False)  # warm-up
    result, batched = timed_run(lambda: ablate(vqa, inp, ablations, batch_size=args.sweep_batch, progress=False),
                                device)
    record.update(batched_seconds=batched)
    log(budget, f"head sweep batched: {len(ablations)} heads in {batched:.2f} s")
    one_forward = timed_run(lambda: naive_sweep(vqa, inp, ablations[:1]), device)[1]  # warm-up and probe
    allowance = min(args.naive_sweep_s, max(budget.left() * 0.3, 1.0))
    n = int(min(len(ablations), max(4, allowance // max(one_forward, 1e-4))))
    subset = [ablations[int(i)] for i in torch.linspace(0, len(ablations) - 1, n).round().long().unique()]
    naive, naive_seconds = timed_run(lambda: naive_sweep(vqa, inp, subset), device)
    per_head = naive_seconds / len(subset)
    index = [ablations.index(x) for x in subset]
    error = (naive.cpu() - result.clean_logprob - result.delta[index]).abs().max().item()
    record.update(naive_heads_timed=len(subset), naive_seconds_timed=naive_seconds,
                  naive_seconds_extrapolated=per_head * len(ablations), speedup=per_head * len(ablations) / batched,
                  max_abs_diff_batched_vs_naive=error, batched_ratio_to_forward=(
                      batched / forward_seconds if forward_seconds else None),
                  note=f"one forward per head timed on {len(subset)} of {len(ablations)} heads (evenly spaced) and "
                       "extrapolated linearly (every such forward costs the same)")
    log(budget, f"head sweep: naive {per_head * len(ablations):.2f} s extrapolated from {len(subset)} heads, "
                f"speed-up {record['speedup']:.1f}x, max |diff| {error:.2e}")


def bench_igos(vqa, inp, word, args, budget, record) -> None:
    from igos import time_pair  # benchmarks/igos.py: batched and reference way, interleaved

    config = dict(iterations=1, n_steps=4, step_fraction=0.1) if args.small_igos else {}
    config["chunk_size"] = args.igos_chunk
    shown = mech_vqa.IGOSConfig(**{k: v for k, v in config.items() if k != "step_fraction"}).to_dict()
    record.update(config={**shown, "step_fraction": config.get("step_fraction", 0.02)}, tokens=[word],
                  note="iGOS+ (IGOSConfig defaults = the authors' README budget unless --small) on the answer word "
                       "by hand; both ways are complete igos() calls with the same seed")
    for reference in (False, True):  # warm-up of both ways' kernels, backward included
        igos(vqa, inp, tokens=[word], seed=0, progress=False, reference=reference, iterations=1, n_steps=1,
             mask_size=4, step_fraction=0.5, chunk_size=args.igos_chunk)
    results, times = time_pair(vqa, inp, [word], 1, **config)
    fast, slow = results["batched"], results["reference"]
    d_del, d_ins = abs(fast.deletion_auc - slow.deletion_auc), abs(fast.insertion_auc - slow.insertion_auc)
    record.update(
        batched=times["batched"], reference=times["reference"],
        speedup=times["reference"]["total"] / times["batched"]["total"],
        deletion_auc={"batched": fast.deletion_auc, "reference": slow.deletion_auc},
        insertion_auc={"batched": fast.insertion_auc, "reference": slow.insertion_auc},
        max_auc_diff=max(d_del, d_ins), auc_equal=max(d_del, d_ins) <= 0.02,
        max_mask_diff=float((fast.mask - slow.mask).abs().max()),
        max_curve_diff=max(float((fast.deletion_curve - slow.deletion_curve).abs().max()),
                           float((fast.insertion_curve - slow.insertion_curve).abs().max())))
    log(budget, f"iGOS+: batched {times['batched']['total']:.2f} s, reference {times['reference']['total']:.2f} s, "
                f"speed-up {record['speedup']:.2f}x, |AUC diff| {record['max_auc_diff']:.3g}")


def targets(stages: dict, shape: str, device) -> dict:
    """The issue's targets, evaluated; they apply to the LLaVA-1.5-7B shape on a GPU only."""
    def get(stage, key):
        return stages.get(stage, {}).get(key)

    heads_ratio, heads_s = get("all_heads_increase", "ratio_to_forward"), get("all_heads_increase", "seconds")
    out = {
        "applies": shape == "llava-1.5-7b" and device.type == "cuda",
        "all_heads_incl_forward_le_1.2x_and_lt_100ms": None if heads_ratio is None else bool(
            heads_ratio <= 1.2 and heads_s < 0.1),
        "head_sweep_ge_5x": None if get("head_ablation_sweep", "speedup") is None else bool(
            get("head_ablation_sweep", "speedup") >= 5),
        "igos_ge_5x_equal_auc_lt_10s": None if get("igos", "speedup") is None else bool(
            get("igos", "speedup") >= 5 and get("igos", "auc_equal") and get("igos", "batched")["total"] < 10),
        "head_level_peak_memory_le_1.1x": None if get("all_heads_increase", "peak_rise_ratio_to_forward") is None
        else bool(get("all_heads_increase", "peak_rise_ratio_to_forward") <= 1.1),
    }
    return out


# ============================================================================================ main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", required=True, type=Path, help="output folder (gpu_results.json goes there)")
    parser.add_argument("--small", action="store_true",
                        help="CPU-sized: the mid-size benchmark shape and a short iGOS budget")
    parser.add_argument("--tiny-only", action="store_true",
                        help="seconds: tiny benchmark shape, layout gqa unless --layouts says otherwise")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="time budget; the remaining stages are skipped when it is spent (default 420 on a "
                             "GPU, 1200 on the CPU)")
    parser.add_argument("--layouts", default=None, help=f"comma-separated subset of {list(tiny_layouts())}")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of the methods")
    parser.add_argument("--dtypes", default="bfloat16,float16", help="half precisions checked against fp32")
    parser.add_argument("--bench-shape", choices=list(LLAVA_SHAPES), default=None)
    parser.add_argument("--bench-dtype", default=None,
                        help="default bfloat16; float32 with --small on the CPU (CPUs without bf16 matrix "
                             "instructions run bf16 products ~100x slower than fp32)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: tiny, bench")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 10 on a GPU, 3 on the CPU)")
    parser.add_argument("--sweep-batch", type=int, default=None, help="ablations per batch (default 32 GPU, 16 CPU)")
    parser.add_argument("--naive-sweep-s", type=float, default=30.0,
                        help="most seconds spent timing one forward per head")
    parser.add_argument("--igos-chunk", type=int, default=10,
                        help="iGOS rows per forward/backward (10 keeps a 7B model's activations ~45 GB)")
    parser.add_argument("--tiny-share", type=float, default=0.45, help="share of the budget part 1 may use")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 with --device cpu, else 4: the CPU references are tiny "
                             "models, which more threads only slow down)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.budget_s is None:
        args.budget_s = 420.0 if device.type == "cuda" else 1200.0
    if args.layouts is None:
        args.layouts = "gqa" if args.tiny_only else ",".join(tiny_layouts())
    args.layouts = [x for x in args.layouts.split(",") if x]
    args.methods = [x for x in args.methods.split(",") if x]
    args.dtypes = [x for x in args.dtypes.split(",") if x]
    unknown = [x for x in args.layouts if x not in tiny_layouts()] + [x for x in args.methods if x not in METHODS]
    unknown += [x for x in args.dtypes if x not in HALF_TOLERANCES]
    if unknown:
        parser.error(f"unknown layouts / methods / dtypes {unknown}")
    if args.bench_shape is None:
        args.bench_shape = "tiny" if args.tiny_only else "mid" if args.small else "llava-1.5-7b"
    if args.bench_dtype is None:
        args.bench_dtype = "float32" if args.small and device.type == "cpu" else "bfloat16"
    args.small_igos = args.small or args.tiny_only
    args.repeats = args.repeats or (10 if device.type == "cuda" else 3)
    args.sweep_batch = args.sweep_batch or (32 if device.type == "cuda" else 16)
    args.skip = {x for x in args.skip.split(",") if x}
    return args, device


def main(argv=None) -> int:
    args, device = parse_args(argv)
    torch.set_num_threads(args.threads or (1 if device.type == "cpu" else min(4, os.cpu_count() or 1)))
    if device.type == "cuda":  # fp32 must be fp32 for the identity checks (cuDNN convolutions default to TF32)
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    args.out.mkdir(parents=True, exist_ok=True)
    budget = Budget(args.budget_s)
    report = Report(args.out / RESULTS_NAME, {
        "issue": 19,
        "environment": environment(device),
        "settings": {k: (sorted(v) if isinstance(v, set) else str(v) if isinstance(v, Path) else v)
                     for k, v in vars(args).items()},
        "tiny_checks": {"status": "pending"},
        "benchmark": {"status": "pending", "stages": {}},
        "nulls": [],
    })
    report.write()
    log(budget, f"device {device} ({report.data['environment']['device_name']}), budget {args.budget_s:.0f} s, "
                f"out {args.out / RESULTS_NAME}")
    stop_on_signals()
    budget.arm()
    try:
        for part, key, fn in (("tiny", "tiny_checks", run_tiny_checks), ("bench", "benchmark", run_benchmark)):
            section = report.data[key]
            if part in args.skip:
                section.update(status="skipped", reason=f"--skip {part}")
                continue
            if budget.expired or budget.left() <= 1:
                section.update(status="skipped", reason="time budget spent before this part started")
                continue
            log(budget, f"== {key}")
            guarded(section, fn, args, device, budget, report)
            report.write()
    except (BudgetExceeded, Stopped) as err:  # the alarm between guarded steps, or gpu.sh's timeout
        log(budget, f"stopped: {type(err).__name__} {err}")
        report.data.setdefault("stopped", f"{type(err).__name__}: {err}")
    finally:
        budget.disarm()
        for sig in (signal.SIGTERM, signal.SIGINT):  # the final write is not interrupted
            signal.signal(sig, signal.SIG_IGN)
    reason = report.data.get("stopped") or "time budget spent"
    for section in (report.data["tiny_checks"], report.data["benchmark"]):
        if section.get("status") in ("running", "pending"):
            section.update(status="partial" if section["status"] == "running" else "skipped", reason=reason)
    report.data["wall_s"] = budget.elapsed()
    report.data["budget_left_s"] = budget.left()
    report.write()
    summary = report.data["tiny_checks"].get("summary", {})
    log(budget, f"done: {summary.get('passed', 0)} of {summary.get('checks', 0)} checks passed; "
                f"benchmark {report.data['benchmark']['status']}; wrote {report.path}")
    return 0


if __name__ == "__main__":
    if "--device" in sys.argv and sys.argv[sys.argv.index("--device") + 1] == "cpu" and \
            os.environ.get("MALLOC_MMAP_THRESHOLD_") != "65536":  # freed tensors must leave the resident set
        os.execve(sys.executable, [sys.executable, *sys.argv],
                  dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0"))
    sys.exit(main())
