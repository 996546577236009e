"""Typed results: save/load round trips through safetensors + JSON, in a fresh process too."""

import json
import subprocess
import sys

import torch

from mech_vqa.results import PatchMap, Result


def _patch_map():
    return PatchMap(scores=torch.arange(16.0).view(4, 4), method="test", image_size=[32, 32],
                    targets=[{"token_id": 3, "position": 7, "token": "red"}], box=[0, 0, 16, 16], info={"k": 1})


def test_patch_map_verbs(tmp_path):
    pm = _patch_map()
    assert pm.pointing_game() == 0.0  # the peak (cell 3,3) is outside the top-left box
    assert abs(pm.in_box_share() - (0 + 1 + 4 + 5) / sum(range(16))) < 1e-6
    top = pm.topk(3)
    assert list(zip(top.row, top.col)) == [(3, 3), (3, 2), (3, 1)] and list(top["rank"]) == [1, 2, 3]
    frame = pm.to_dataframe()
    assert len(frame) == 16 and frame.in_box.sum() == 4
    assert pm.resample((8, 8)).shape == (8, 8)
    constant = PatchMap(scores=torch.zeros(4, 4), image_size=[32, 32], box=[0, 0, 16, 16])
    assert constant.pointing_game() is None and constant.in_box_share() == 0.0
    fig, ax = pm.plot()
    assert ax.get_title().startswith("test")


def test_save_load_in_a_fresh_process_runs_no_code(tmp_path):
    path = _patch_map().save(tmp_path / "pm")
    payload = json.loads(path.read_text())
    assert payload["type"] == "PatchMap" and (tmp_path / "pm.safetensors").exists()
    code = ("import sys, torch; from mech_vqa.results import Result; r = Result.load(sys.argv[1]); "
            "assert torch.equal(r.scores, torch.arange(16.0).view(4, 4)); print(type(r).__name__, r.box)")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "pm")], capture_output=True, text=True, check=True)
    assert out.stdout.split()[0] == "PatchMap"
    loaded = Result.load(tmp_path / "pm.json")
    assert loaded.targets == _patch_map().targets and loaded.info == {"k": 1}


def test_comparison_bundle_roundtrip(tmp_path):
    from mech_vqa.compare import Comparison

    maps = {"a": _patch_map(), "b": PatchMap(scores=torch.ones(2, 2), method="b", image_size=[32, 32])}
    comparison = Comparison(maps=maps, table=[{"method": "a", "insertion_auc": 0.9, "deletion_auc": 0.1}],
                            correlations={"a|b": 0.5}, selection=[{"token": "red"}], info={"model": "m"})
    loaded = Result.load(comparison.save(tmp_path / "cmp"))
    assert isinstance(loaded, Comparison) and list(loaded.maps) == ["a", "b"]
    assert torch.equal(loaded.maps["b"].scores, torch.ones(2, 2)) and loaded.correlations == {"a|b": 0.5}
    assert loaded.correlation_matrix().loc["b", "a"] == 0.5


def test_every_result_prints_one_short_line(tiny_vqa, prepared):
    """``print(result)`` is a summary (types, shapes, headline numbers), never the tensors' values."""
    from mech_vqa import ablate, attention_mass, explain, head_ablations, logit_lens
    from mech_vqa.results.base import _REGISTRY

    for name, cls in _REGISTRY.items():  # no result type falls back to the dataclass repr of every tensor
        assert cls.__repr__ is Result.__repr__ or "__repr__" in cls.__dict__, name
    target = prepared.target(3)
    explanation = explain(tiny_vqa, prepared, target, neurons=True, progress=False)
    lens = logit_lens(tiny_vqa, prepared, "red")
    results = [explanation, explanation.layers, explanation.heads, explanation.positions, explanation.neurons,
               explanation.patch_map, lens, ablate(tiny_vqa, prepared, head_ablations(tiny_vqa), targets=[target],
                                                   progress=False), attention_mass(tiny_vqa, prepared)]
    for result in results:
        text = repr(result)
        assert "\n" not in text and len(text) < 500 and "tensor(" not in text, text
        assert text.startswith(type(result).__name__)
    assert repr(lens).startswith("LogitLens(model='tiny-gqa', layers=2 + input, 16 image tokens (grid 4x4")
    assert "word='red': max p=" in repr(lens)
    assert "scores=tensor[2, 4]" in repr(explanation.heads)


def test_saved_results_are_strict_json_and_load_their_nan_back(tmp_path):
    import math

    from mech_vqa.results.base import dumps_strict, loads_strict

    def refuse(name):
        raise ValueError(name)

    pm = PatchMap(scores=torch.zeros(2, 2), method="x", image_size=[8, 8],
                  info={"auc": float("nan"), "curve": [1.0, float("-inf")]})
    path = pm.save(tmp_path / "pm")
    payload = json.loads(path.read_text(), parse_constant=refuse)
    assert payload["fields"]["info"] == {"auc": None, "curve": [1.0, None]}
    assert payload["non_finite"] == {"fields.info.auc": "NaN", "fields.info.curve.1": "-inf"}
    loaded = Result.load(path)
    assert math.isnan(loaded.info["auc"]) and loaded.info["curve"] == [1.0, float("-inf")]
    text = dumps_strict({"a": [float("inf"), {"b": float("nan")}], "c": torch.tensor([1.0, float("nan")])})
    assert json.loads(text, parse_constant=refuse)["non_finite"] == {"a.0": "inf", "a.1.b": "NaN", "c.1": "NaN"}
    again = loads_strict(text)
    assert again["a"][0] == float("inf") and math.isnan(again["a"][1]["b"]) and math.isnan(again["c"][1])
