"""Tensor parallelism (transformers' ``tp_plan="auto"``) on CPU: 2 gloo ranks under torchrun.

The ranks run tests/tensor_parallel_worker.py: each holds half the heads and MLP neurons of the tiny
LLaVA, and checks that captures, explain, the logit lens, raw attention, neuron increases, relevancy
(gradients through the sharded attention), interventions on heads of either rank, a head-ablation
sweep and a per-head attention knockout equal the unsharded model's to 1e-5, with no hook of ours left.
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
            "logit_lens word_probs", "raw_attention", "neuron_increase", "relevancy rows", "intervention logits",
            "intervention z", "head ablation delta", "knockout per head", "nnsight logits", "nnsight explain heads",
            "nnsight explain layers.attention", "nnsight explain positions", "nnsight logit_lens word_probs",
            "nnsight raw_attention", "nnsight neuron_increase", "nnsight relevancy rows", "nnsight intervention logits",
            "nnsight head ablation delta", "nnsight knockout per head", "nnsight remote refused", "hooks_left"}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="needs torch.distributed with gloo")


def test_tensor_parallel_model_equals_unsharded_on_every_rank(tmp_path):
    model, _ = tiny_llava(seed=0, kv_heads=2)   # the worker rebuilds the same weights as its reference
    model.save_pretrained(tmp_path / "model")
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(WORKER), str(tmp_path / "model"), str(tmp_path)]
    run = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert run.returncode == 0, (run.stdout + run.stderr)[-6000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, report in enumerate(reports):
        assert report.pop("rank") == rank
        assert COMPARED <= report.keys(), sorted(COMPARED - report.keys())
        assert max(value for key, value in report.items()) <= 1e-5


def test_head_edits_go_to_the_rank_that_holds_the_head():
    """Rank 1 of 2 holds heads 2 and 3 of 4: it edits head 2 (its local head 0) with head 2's value row, and
    drops edits of heads it does not hold."""
    from mech_vqa.interventions import Intervention, _local_edits

    value = torch.arange(2 * 16.0).view(2, 16)
    edits = [Intervention("z", 0, heads=[1, 2], mode="replace", value=value), Intervention("z", 0, heads=0),
             Intervention("z", 0, mode="replace", value=torch.ones(4, 16))]
    local = _local_edits(edits, range(2, 4), n_heads=4)
    assert [edit.heads for edit in local] == [(0,), (0, 1)]
    assert torch.equal(local[0].value, value[1:2]) and local[1].value.shape == (2, 16)
    with pytest.raises(IndexError, match="head 4 is out of range"):
        _local_edits([Intervention("z", 0, heads=4)], range(2), n_heads=4)
