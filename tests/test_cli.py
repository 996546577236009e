import json

import pytest

from mech_vqa.cli import build_parser, main
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
