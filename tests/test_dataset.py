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
from mech_vqa.dataset import DatasetError, ResultsFile, read_dataset, run_dataset
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
    rows = [json.loads(line) for line in out.read_text().splitlines()]
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
        if out.exists() and out.read_text().count("\n") >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make the dataset longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    written = out.read_text().count("\n")
    assert 2 <= written < n
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=300)
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids, key=int) == [str(i) for i in range(n)]
