"""Tensor parallelism (transformers' ``tp_plan="auto"``) on CPU: 2 gloo ranks under torchrun.

The ranks run tests/tensor_parallel_worker.py: each holds half the heads and MLP neurons of the tiny
LLaVA, and checks that captures, explain, the logit lens, raw attention, neuron increases, relevancy
(gradients through the sharded attention), interventions on heads of either rank and a head-ablation
sweep equal the unsharded model's to 1e-5, with no hook of ours left.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mech_vqa.build import tiny_llava

WORKER = Path(__file__).resolve().parent / "tensor_parallel_worker.py"
REPO = WORKER.parents[1]
#: what every rank must have compared (a rank that skipped a check cannot pass)
COMPARED = {"logits", "capture ('z', 0)", "capture ('q', 1)", "capture ('k', 1)", "capture ('v', 1)",
            "capture ('pattern', 1)", "capture ('mlp_act', 1)", "explain layers.attention", "explain layers.mlp",
            "explain heads", "explain positions", "explain patch_map", "logit_lens top_probs",
            "logit_lens word_probs", "raw_attention", "neuron_increase", "relevancy rows", "intervention logits", "intervention z",
            "head ablation delta", "nnsight refused", "hooks_left"}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def test_tensor_parallel_model_equals_unsharded_on_every_rank(tmp_path):
    model, _ = tiny_llava(seed=0, kv_heads=2)   # the worker rebuilds the same weights as its reference
    model.save_pretrained(tmp_path / "model")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(tmp_path / "model"), str(tmp_path)]
    run = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, report in enumerate(reports):
        assert report.pop("rank") == rank
        assert COMPARED <= report.keys(), sorted(COMPARED - report.keys())
        assert max(value for key, value in report.items()) <= 1e-5
