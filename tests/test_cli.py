import json
import os
from pathlib import Path

import pytest
import torch

from mech_vqa.cli import build_parser, main
from mech_vqa.dataset import read_results
from mech_vqa.demo import run_demo


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("demo", "run", "summary", "eval"):
        assert command in text
    assert build_parser().parse_args(["run", "ablate", "d.jsonl", "--out", "r.jsonl"]).task == "ablate"


def test_demo_writes_heatmaps_and_scores(tiny_vqa, tmp_path):
    scores = run_demo(tiny_vqa, tmp_path, methods=["mechanistic", "raw_attention", "igos++"],
                      options={"igos": {"mask_size": 4, "iterations": 1, "n_steps": 2}})
    saved = json.loads((tmp_path / "scores.json").read_text())
    assert saved["question"] == scores["question"] and saved["box"] is not None
    for name in ("mechanistic", "raw_attention", "igos++"):
        entry = saved["methods"][name]
        assert 0 <= entry["in_box_share"] <= 1
        with open(entry["png"], "rb") as handle:
            assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "comparison.png").exists() and (tmp_path / "heads.png").exists()


def test_summary_of_missing_file_is_clear(tmp_path, capsys):
    assert main(["summary", str(tmp_path / "none.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_run_compare_on_the_tiles_of_a_saved_llava_next(tiny_next_vqa, tmp_path, capsys):
    """The scripted path end to end on a tiled model: saved, reloaded by path, high-resolution maps."""
    import numpy as np
    from PIL import Image

    tiny_next_vqa.model.save_pretrained(tmp_path / "model")
    tiny_next_vqa.processor.save_pretrained(tmp_path / "model")
    rng = np.random.RandomState(0)
    rows = []
    for i, (w, h) in enumerate([(48, 40), (70, 40)]):
        Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")).save(tmp_path / f"{i}.png")
        rows.append({"image": f"{i}.png", "question": "What is the color of the dog?", "answer": "The dog is red.",
                     "box": [0, 0, w // 2, h // 2]})
    (tmp_path / "data.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    out = tmp_path / "results.jsonl"
    args = ["run", "explain", str(tmp_path / "data.jsonl"), "--out", str(out), "--model", str(tmp_path / "model"),
            "--view", "1", "--no-progress"]
    assert main(args) == 0
    results = read_results(out)
    assert [r["status"] for r in results] == ["ok", "ok"] and all(0 <= r["in_box_share"] <= 1 for r in results)
    assert main(["run", "ablate", str(tmp_path / "data.jsonl"), "--out", str(tmp_path / "a.jsonl"),
                 "--view", "1"]) == 2
    assert "--view applies to the explain and compare tasks" in capsys.readouterr().err
    scores = run_demo(tiny_next_vqa, tmp_path / "demo", image=tmp_path / "1.png", question="What is the color of the dog?",
                      methods=["mechanistic", "raw_attention"], view=1)
    assert all(Path(entry["png"]).exists() for entry in scores["methods"].values())


def test_model_options_and_task_help(capsys, monkeypatch):
    from mech_vqa.cli import _settings, default_threads

    for command in (["demo"], ["run", "answer", "d.jsonl", "--out", "r.jsonl"]):
        args = build_parser().parse_args(command)
        assert (args.model, args.device, args.dtype, args.threads) == (None, "auto", "auto", default_threads())
    assert build_parser().parse_args(["eval", "--threads", "3"]).threads == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert default_threads() == max(1, len(os.sched_getaffinity(0)) // 2)
    args = build_parser().parse_args(["run", "answer", "d.jsonl", "--out", "r.jsonl", "--threads", "1"])
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert _settings(args) == ("cpu", torch.float32)
    args.device = "cuda"
    with pytest.raises(ValueError, match="sees no CUDA GPU.*--device cpu"):
        _settings(args)
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = capsys.readouterr().out
    from mech_vqa.tasks import TASK_HELP

    for task in TASK_HELP:
        assert f"  {task} " in text
    assert text.count("Columns:") == len(TASK_HELP) and "non_finite" in text and "resumes" in text
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "number of fresh synthetic questions" in capsys.readouterr().out
