"""benchmarks/gpu.py (issue 19) on its CPU smoke path: every section written, every check passing, strict JSON.

The script is made to run unattended on a GPU lent for minutes, so its own failure modes are tested here
where no GPU is needed: a complete run (one tiny layout, the tiny benchmark shape) and a budget that runs
out mid-way (the JSON must still be written, with what was skipped saying why).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
METHODS = ["explain", "neuron_increase", "logit_lens", "raw_attention_map", "relevancy_map", "causal_map", "igos+",
           "igos++", "insertion_deletion", "head_ablation_sweep", "compare"]
STAGES = ["forward", "forward_last_logits", "capture", "all_heads_increase", "one_head_positions", "explain",
          "head_ablation_sweep", "igos"]


def run_script(out: Path, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               MPLBACKEND="Agg", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(out), *args],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    def no_constants(name):
        raise AssertionError(f"gpu_results.json holds {name}: not strict JSON")

    return json.loads((out / "gpu_results.json").read_text(), parse_constant=no_constants)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> dict:
    return run_script(tmp_path_factory.mktemp("gpu"), "--tiny-only", "--threads", "1")


def test_every_method_checked_in_every_precision_and_passing(tiny_run):
    section = tiny_run["tiny_checks"]
    assert section["status"] == "done"
    checks = section["checks"]
    assert {(c["method"], c["dtype"]) for c in checks} == {
        (m, d) for m in METHODS for d in ("float32", "bfloat16", "float16")}
    failed = [(c["method"], c["dtype"], c.get("error") or c.get("mismatched")) for c in checks if not c["passed"]]
    assert not failed
    for check in checks:
        if check["dtype"] == "float32":
            # the CPU stands in for the device here: the same code on the same device is bit-identical
            assert check["max_abs_diff"] == 0.0 and check["repeat_identical"], check
            assert check["atol"] == section["fp32_tolerances"][check["method"]]["atol"]
        else:
            assert check["max_scaled_diff"] <= section["half_tolerances"][check["dtype"]]
        assert check["fields"] > 0
    assert section["summary"]["passed"] == section["summary"]["checks"] == len(checks)


def test_benchmark_records_every_stage_as_ratios_to_the_forward(tiny_run):
    bench = tiny_run["benchmark"]
    assert bench["status"] == "done" and bench["shape"] == "tiny"
    stages = bench["stages"]
    assert set(STAGES) <= set(stages)
    for name in STAGES:
        assert stages[name]["status"] == "ok", (name, stages[name])
    for name in STAGES[:6]:
        assert stages[name]["seconds"] > 0 and stages[name]["ratio_to_forward"] > 0
        assert "peak_rise_bytes" in stages[name]
    assert stages["forward"]["ratio_to_forward"] == 1.0
    sweep = stages["head_ablation_sweep"]
    assert sweep["heads"] == bench["model"]["heads_total"] == 8
    assert sweep["max_abs_diff_batched_vs_naive"] < 1e-4 and sweep["speedup"] > 0
    igos = stages["igos"]
    assert igos["auc_equal"] and igos["speedup"] > 0
    assert set(bench["targets"]) >= {"applies", "head_sweep_ge_5x", "igos_ge_5x_equal_auc_lt_10s"}
    assert bench["targets"]["applies"] is False  # not the 7B shape on a GPU


def test_environment_and_settings_recorded(tiny_run):
    env = tiny_run["environment"]
    for key in ("date_utc", "torch", "transformers", "device", "device_name", "torch_cuda"):
        assert key in env
    assert env["device"] == "cpu"
    assert tiny_run["settings"]["layouts"] == ["gqa"]
    assert tiny_run["wall_s"] > 0 and isinstance(tiny_run["nulls"], list)


def test_a_spent_budget_skips_the_rest_and_still_writes_the_json(tmp_path):
    result = run_script(tmp_path, "--tiny-only", "--threads", "1", "--layouts", "gqa,mha", "--budget-s", "8")
    tiny, bench = result["tiny_checks"], result["benchmark"]
    # the gqa layout alone takes longer than 8 s: the alarm stops it (or, on a slow start, part 1 itself)
    assert tiny["status"] in ("partial", "skipped")
    reasons = [tiny.get("reason", "")] + [e.get("reason", "") for e in tiny.get("layout_errors", [])]
    assert any("budget" in r for r in reasons)
    if tiny["status"] == "partial":
        assert {"layout": "mha", "status": "skipped", "reason": "time budget spent"} in tiny["layout_errors"]
    assert bench["status"] == "skipped" and "budget" in bench["reason"]
    assert result["budget_left_s"] <= 0.5 and result["wall_s"] >= 8
