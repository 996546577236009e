"""Sharded runs: deterministic disjoint shards, launcher environments, resume per rank, merging."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mech_vqa.cli import main
from mech_vqa.dataset import read_results, read_results_file
from mech_vqa.organism import EVAL_DIR
from mech_vqa.sharding import (
    Shard,
    ShardError,
    local_device,
    merge_shards,
    parse_shard,
    resolve_shard,
    shard_from_env,
)

EVAL_ITEMS = EVAL_DIR / "items.jsonl"
N_EVAL = len(EVAL_ITEMS.read_text().splitlines())


def _comparable(rows):
    """Rows by id, less their runtime (the one field that differs between two runs of one computation)."""
    return {row["id"]: {k: v for k, v in row.items() if k != "runtime_s"} for row in rows}


# ----------------------------------------------------------------------------- shard choice
def test_shards_are_disjoint_cover_everything_and_interleave():
    rows = [{"_index": i} for i in range(11)]
    parts = [Shard(i, 3).select(rows) for i in range(3)]
    indices = [[r["_index"] for r in part] for part in parts]
    assert indices == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(sum(indices, [])) == list(range(11))
    assert Shard(1, 3).path("out/r.jsonl") == Path("out/r.shard-1-of-3.jsonl")
    assert Shard().path("out/r.jsonl") == Path("out/r.jsonl")


def test_shard_from_launcher_environments():
    assert shard_from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Shard(1, 4)   # torchrun, accelerate
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "2", "SLURM_ARRAY_TASK_COUNT": "3"}) == Shard(2, 3)
    assert shard_from_env({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "3",
                           "SLURM_ARRAY_TASK_MIN": "4"}) == Shard(1, 3)                        # --array=4-6
    assert shard_from_env({"RANK": "0", "WORLD_SIZE": "1"}) == Shard()
    assert shard_from_env({}) == Shard()
    assert resolve_shard("3/8", {"RANK": "1", "WORLD_SIZE": "2"}) == Shard(3, 8)            # --shard wins
    assert local_device("cuda", {"LOCAL_RANK": "3"}) == "cuda:3"
    assert local_device("cuda:1", {"LOCAL_RANK": "3"}) == "cuda:1" and local_device("cuda", {}) == "cuda"


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1", "a/b", "0/0", "1/2/3"])
def test_bad_shard_specification_is_one_clear_error(text):
    with pytest.raises(ShardError, match="--shard|shard index|number of shards"):
        parse_shard(text)


def test_bad_shard_on_the_command_line_fails_before_the_model_loads(tmp_path, capsys):
    assert main(["run", "answer", str(EVAL_ITEMS), "--out", str(tmp_path / "r.jsonl"), "--shard", "2/2"]) == 2
    assert "outside 0..1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


# ------------------------------------------------------------------ runs over the shipped set
@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "answers.jsonl"
    assert main(["run", "answer", str(EVAL_ITEMS), "--out", str(out), "--no-progress", "--threads", "1"]) == 0
    return read_results(out)


def test_torchrun_two_ranks_then_merge_equals_a_single_run(single_run, tmp_path):
    out = tmp_path / "answers.jsonl"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "mech_vqa.cli", "run", "answer", str(EVAL_ITEMS), "--out", str(out), "--no-progress"],
                   env=env, check=True, timeout=600, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    shards = sorted(tmp_path.glob("answers.shard-*-of-2.jsonl"))
    assert [p.name for p in shards] == ["answers.shard-0-of-2.jsonl", "answers.shard-1-of-2.jsonl"]
    per_rank = [read_results_file(p) for p in shards]
    assert [h["shard"] for h, _ in per_rank] == [{"index": 0, "count": 2}, {"index": 1, "count": 2}]
    ids = [{r["id"] for r in rows} for _, rows in per_rank]
    assert not ids[0] & ids[1] and len(ids[0]) + len(ids[1]) == N_EVAL      # no item on two ranks

    merged = tmp_path / "merged.jsonl"
    assert main(["merge", str(tmp_path / "answers.shard-*-of-2.jsonl"), "--out", str(merged)]) == 0
    header, rows = read_results_file(merged)
    assert [r["index"] for r in rows] == list(range(N_EVAL))                   # each item once, in order
    assert _comparable(rows) == _comparable(single_run)
    assert header["task"] == "answer" and "shard" not in header and len(header["merged_from"]) == 2


def test_sigkill_of_one_rank_then_relaunch_loses_and_duplicates_nothing(tmp_path):
    limit, out = 16, tmp_path / "explain.jsonl"
    args = ["run", "explain", str(EVAL_ITEMS), "--out", str(out), "--limit", str(limit), "--no-progress",
            "--threads", "1"]
    rank0 = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    shard0 = tmp_path / "explain.shard-0-of-2.jsonl"
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", **rank0)
    proc = subprocess.Popen([sys.executable, "-m", "mech_vqa.cli", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if shard0.exists() and shard0.read_text().count("\n") >= 2:   # the header and one row
            break
        time.sleep(0.02)
    assert proc.poll() is None, "rank 0 finished before it could be killed; raise the limit"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with open(shard0, "a") as handle:      # as if killed in the middle of writing a row
        handle.write('{"id": "14", "index": 14, "sta')
    before = len(read_results(shard0))
    assert 1 <= before < limit // 2

    assert main([*args, "--shard", "1/2"]) == 0             # the other rank, undisturbed
    incomplete = tmp_path / "incomplete.jsonl"
    assert main(["merge", str(tmp_path), "--out", str(incomplete)]) == 1
    report = merge_shards(tmp_path / "explain.shard-*-of-2.jsonl", incomplete)
    assert not report["complete"] and report["missing_items"] and not report["duplicates"]

    assert main([*args, "--shard", "0/2"]) == 0             # relaunch the killed rank: it resumes
    rows0 = read_results(shard0)
    assert sorted(int(r["index"]) for r in rows0) == list(range(0, limit, 2))

    merged = tmp_path / "merged.jsonl"
    report = merge_shards(tmp_path, merged)
    assert report["complete"] and not report["duplicates"] and report["items"] == limit
    single = tmp_path / "single" / "explain.jsonl"
    assert main(["run", "explain", str(EVAL_ITEMS), "--out", str(single), "--limit", str(limit), "--no-progress",
                 "--threads", "1"]) == 0
    assert _comparable(read_results(merged)) == _comparable(read_results(single))


# ----------------------------------------------------------------------------------- merging
def _fake_shard(path, index, count, task="answer", options=None, n_items=4, rows=None):
    header = {"mech_vqa_results": 1, "task": task, "options": options or {}, "model": {"name": "m", "dtype": "float32"},
              "shard": {"index": index, "count": count}, "dataset": "d.jsonl", "dataset_sha256": "abc",
              "n_items": n_items}
    rows = rows if rows is not None else [{"id": str(i), "index": i, "status": "ok", "value": i, "runtime_s": 0.1 * i}
                                          for i in range(n_items) if i % count == index]
    path.write_text("\n".join(json.dumps(r) for r in [header, *rows]) + "\n")
    return path


def test_shards_of_other_settings_refuse_to_merge(tmp_path):
    _fake_shard(tmp_path / "a.shard-0-of-2.jsonl", 0, 2)
    _fake_shard(tmp_path / "a.shard-1-of-2.jsonl", 1, 2, task="explain")
    with pytest.raises(ShardError, match="other settings.*task"):
        merge_shards(tmp_path, tmp_path / "m.jsonl")
    _fake_shard(tmp_path / "a.shard-1-of-2.jsonl", 1, 2, options={"view": 1})
    with pytest.raises(ShardError, match="other settings.*options"):
        merge_shards(tmp_path, tmp_path / "m.jsonl")
    _fake_shard(tmp_path / "a.shard-1-of-2.jsonl", 1, 3)
    with pytest.raises(ShardError, match="different numbers of shards"):
        merge_shards(tmp_path, tmp_path / "m.jsonl")
    assert not (tmp_path / "m.jsonl").exists()


def test_merge_reports_missing_shards_and_duplicates(tmp_path):
    _fake_shard(tmp_path / "a.shard-0-of-3.jsonl", 0, 3, n_items=7)
    extra = [{"id": "0", "index": 0, "status": "ok", "value": 0, "runtime_s": 9.0},       # same item, same values
             {"id": "1", "index": 1, "status": "ok", "value": 1, "runtime_s": 0.1}]
    _fake_shard(tmp_path / "a.shard-1-of-3.jsonl", 1, 3, n_items=7, rows=extra)
    report = merge_shards(tmp_path, tmp_path / "m.jsonl")
    assert report["missing_shards"] == [2] and report["missing_items"] == [2, 4, 5]
    assert report["duplicates"] == [0] and report["conflicting"] == [] and not report["complete"]
    assert [r["index"] for r in read_results(tmp_path / "m.jsonl")] == [0, 1, 3, 6]


def test_merge_of_nothing_is_a_clear_error(tmp_path, capsys):
    assert main(["merge", str(tmp_path / "none.shard-*-of-*.jsonl"), "--out", str(tmp_path / "m.jsonl")]) == 2
    assert "no shard file matches" in capsys.readouterr().err


def _numbers_close(a, b, tol=1e-5) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_numbers_close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_numbers_close(x, y, tol) for x, y in zip(a, b))
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol * max(1.0, abs(a), abs(b))
    return a == b


def test_shards_run_on_the_nnsight_backend_and_merge_to_the_hooks_rows(tmp_path):
    pytest.importorskip("nnsight")
    args = ["run", "explain", str(EVAL_ITEMS), "--limit", "4", "--no-progress", "--threads", "1"]
    for i in (0, 1):
        assert main([*args, "--out", str(tmp_path / "n.jsonl"), "--backend", "nnsight", "--shard", f"{i}/2"]) == 0
    assert main([*args, "--out", str(tmp_path / "hooks" / "h.jsonl")]) == 0
    report = merge_shards(tmp_path / "n.shard-*-of-2.jsonl", tmp_path / "merged.jsonl")
    assert report["complete"] and report["items"] == 4
    merged, hooks = _comparable(read_results(tmp_path / "merged.jsonl")), _comparable(
        read_results(tmp_path / "hooks" / "h.jsonl"))
    assert merged.keys() == hooks.keys() and all(_numbers_close(merged[k], hooks[k]) for k in merged)
