import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from mech_vqa.build import tiny_llava
from mech_vqa.cli import main as cli_main
from mech_vqa.dataset import DatasetError, ResultsFile, read_dataset, read_results, run_dataset
from mech_vqa.summary import summarize

QUESTION = "What is the color of the dog?"


def _dataset(folder, n=6, bad=False):
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rng = np.random.RandomState(i)
        Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")).save(folder / f"img{i}.png")
        rows.append({"image": f"img{i}.png", "question": QUESTION, "answer": "The dog is red.", "answer_word": "red",
                     "box": [0, 0, 16, 16]})
    if bad:
        (folder / "broken.png").write_bytes(b"not a png")
        rows += [{"image": "missing.png", "question": QUESTION},
                 {"image": "img0.png", "question": ""},
                 {"image": "broken.png", "question": QUESTION},
                 {"image": "img0.png", "question": QUESTION, "box": [10, 10, 50, 20]}]
    path = folder / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_bad_rows_reported_and_run_goes_on(tiny_vqa, tmp_path):
    path = _dataset(tmp_path / "d", n=2, bad=True)
    out = tmp_path / "results.jsonl"
    counts = run_dataset(tiny_vqa, path, out, "ablate", progress=False)
    assert counts == {"done": 6, "skipped": 0, "errors": 4}
    rows = read_results(out)
    errors = {r["index"]: r["error"] for r in rows if r["status"] == "error"}
    assert "does not exist" in errors[2] and "no question" in errors[3]
    assert "cannot be read" in errors[4] and "not inside the 32x32 image" in errors[5]
    ok = [r for r in rows if r["status"] == "ok"]
    assert {a["ablation"] for a in ok[0]["image_ablations"]} == {"object patches", "other patches"}
    assert len(ok[0]["head_delta"]) == 2
    # a second run skips everything
    assert run_dataset(tiny_vqa, path, out, "ablate", progress=False)["skipped"] == 6
    text = summarize(out, figures=str(tmp_path / "fig"))
    assert "image_ablation" in text and "errors" in text and (tmp_path / "fig" / "head_ablation.png").exists()


def test_missing_or_empty_dataset_is_one_clear_error(tmp_path, tiny_vqa):
    with pytest.raises(DatasetError, match="does not exist"):
        read_dataset(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DatasetError, match="has no rows"):
        run_dataset(tiny_vqa, tmp_path / "empty.jsonl", tmp_path / "r.jsonl")
    assert cli_main(["run", "answer", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "r.jsonl")]) == 2


def test_torn_last_line_is_cut_on_resume(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"id": "0"}) + "\n" + '{"id": "1", "sta')
    results = ResultsFile(path)
    assert results.done == {"0"} and path.read_text().count("\n") == 1
    results.append({"id": "1"})
    results.append({"id": "1"})  # never twice
    assert [json.loads(x)["id"] for x in path.read_text().splitlines()] == ["0", "1"]


def test_sigkill_midway_then_resume_gives_one_row_per_item(tmp_path):
    model_dir = tmp_path / "model"
    model, processor = tiny_llava(seed=0)
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    n = 14
    data = _dataset(tmp_path / "d", n=n)
    out = tmp_path / "results.jsonl"
    cmd = [sys.executable, "-m", "mech_vqa.cli", "run", "ablate", str(data), "--out", str(out),
           "--model", str(model_dir), "--no-progress"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if out.exists() and out.read_text().count("\n") >= 3:  # the header and two rows
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make the dataset longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_text().count("\n") - 1  # less the header line
    assert 2 <= written < n
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    ids = [row["id"] for row in read_results(out)]
    assert sorted(ids, key=int) == [str(i) for i in range(n)]


def _strict(text: str):
    """``json.loads`` that refuses NaN / Infinity, as jq and browsers do."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")
    return json.loads(text, parse_constant=refuse)


def _nan_task(vqa, *, image, question, answer, box, row):
    return {"score": float("nan"), "curve": [0.5, float("inf")], "methods": {"a": {"auc": float("-inf")}}}


def test_results_are_strict_json_with_the_reason_kept(tiny_vqa, tmp_path):
    data = _dataset(tmp_path / "d", n=2)
    out = tmp_path / "r.jsonl"
    run_dataset(tiny_vqa, data, out, _nan_task, progress=False)
    header, *rows = [_strict(line) for line in out.read_text().splitlines()]
    assert header["mech_vqa_results"] == 1 and header["task"] == "_nan_task"
    assert rows[0]["score"] is None and rows[0]["curve"] == [0.5, None]
    assert rows[0]["non_finite"] == {"score": "NaN", "curve.1": "inf", "methods.a.auc": "-inf"}


def test_a_compare_run_and_the_demo_write_no_nan(tiny_vqa, tmp_path):
    from mech_vqa.demo import run_demo

    data = _dataset(tmp_path / "d", n=2)
    out = tmp_path / "r.jsonl"
    options = {"igos": {"mask_size": 4, "iterations": 1, "n_steps": 2}}
    run_dataset(tiny_vqa, data, out, "compare", progress=False, methods=["raw_attention", "causal", "igos++"],
                options=options)
    rows = [_strict(line) for line in out.read_text().splitlines()]
    assert [r.get("status") for r in rows[1:]] == ["ok", "ok"]
    assert rows[0]["options"] == {"methods": ["raw_attention", "causal", "igos++"], "options": options}
    scores = run_demo(tiny_vqa, tmp_path / "demo", methods=["raw_attention", "causal"])
    saved = _strict((tmp_path / "demo" / "scores.json").read_text())
    assert saved["question"] == scores["question"]
    text = summarize(out, tables_dir=str(tmp_path / "tables"))
    assert "no_relevant_token" in text
    _strict((tmp_path / "tables" / "summary.json").read_text())


def test_resuming_with_other_settings_is_one_clear_error(tiny_vqa, tiny_mha_vqa, tmp_path, capsys):
    data = _dataset(tmp_path / "d", n=2)
    out = tmp_path / "r.jsonl"
    run_dataset(tiny_vqa, data, out, "answer", progress=False)
    before = out.read_text()
    with pytest.raises(DatasetError, match=r'written with task "answer"; this run has task "explain".*new file name'):
        run_dataset(tiny_vqa, data, out, "explain", progress=False)
    with pytest.raises(DatasetError, match=r'model \{"name": "tiny-gqa".*model \{"name": "tiny-mha"'):
        run_dataset(tiny_mha_vqa, data, out, "answer", progress=False)
    with pytest.raises(DatasetError, match=r'options \{\}; this run has options \{"view": 1\}'):
        run_dataset(tiny_vqa, data, out, "answer", progress=False, view=1)
    assert out.read_text() == before  # nothing appended by a refused run
    # the command line refuses before loading a model (this one does not even exist)
    assert cli_main(["run", "compare", str(data), "--out", str(out), "--model", str(tmp_path / "none")]) == 2
    assert 'this run has task "compare"' in capsys.readouterr().err
    assert run_dataset(tiny_vqa, data, out, "answer", progress=False) == {"done": 0, "skipped": 2, "errors": 0}
    headerless = tmp_path / "old.jsonl"
    headerless.write_text(json.dumps({"id": "0", "status": "ok"}) + "\n")
    with pytest.raises(DatasetError, match="no header"):
        run_dataset(tiny_vqa, data, headerless, "answer", progress=False)


def test_resume_progress_counts_only_the_items_left(tiny_vqa, tmp_path, monkeypatch):
    import mech_vqa.dataset as dataset

    data = _dataset(tmp_path / "d", n=3)
    out = tmp_path / "r.jsonl"
    run_dataset(tiny_vqa, data, out, "answer", limit=1, progress=False)
    totals = []
    real = dataset.tqdm

    def spy(iterable, **kwargs):
        items = list(iterable)
        totals.append(len(items))
        return real(items, **kwargs)

    monkeypatch.setattr(dataset, "tqdm", spy)
    assert run_dataset(tiny_vqa, data, out, "answer", progress=False) == {"done": 2, "skipped": 1, "errors": 0}
    assert totals == [2]


def test_summary_of_a_dataset_is_a_clear_error(tmp_path, capsys):
    data = _dataset(tmp_path / "d", n=2)
    assert cli_main(["summary", str(data)]) == 2
    err = capsys.readouterr().err
    assert "is not a results file" in err and "looks like a dataset" in err and "mech-vqa run" in err


def test_summary_writes_tables_and_only_figures_that_apply(tiny_vqa, tmp_path, monkeypatch):
    data = _dataset(tmp_path / "d", n=2)
    answers, explained = tmp_path / "answers.jsonl", tmp_path / "explain.jsonl"
    run_dataset(tiny_vqa, data, answers, "answer", progress=False)
    text = summarize(answers, figures=str(tmp_path / "fig_answer"), tables_dir=str(tmp_path / "t_answer"))
    assert "none apply" in text and not (tmp_path / "fig_answer").exists()
    run_dataset(tiny_vqa, data, explained, "explain", progress=False)
    text = summarize(explained, figures=str(tmp_path / "fig"), tables_dir=str(tmp_path / "t"))
    assert "## layers" in text and "## top_head" in text and (tmp_path / "fig" / "layers.png").exists()
    import pandas as pd

    layers = pd.read_csv(tmp_path / "t" / "layers.csv")
    assert list(layers.columns) == ["layer", "mean_attn_increase", "mean_mlp_increase", "items"]
    assert len(layers) == tiny_vqa.adapter.n_layers
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t" / "layers.parquet"), layers)
    assert _strict((tmp_path / "t" / "summary.json").read_text())["header"]["task"] == "explain"
    # without pyarrow: CSV still written, and one line says how to get parquet
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    text = summarize(explained, tables_dir=str(tmp_path / "t2"))
    assert "pyarrow is not installed" in text and ".[tables]" in text
    assert (tmp_path / "t2" / "layers.csv").exists() and not (tmp_path / "t2" / "layers.parquet").exists()
