"""Static HTML views: content, size, offline-ness and the notebook display (no browser needed)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from mech_vqa.explorer import answer_view, payload_of, repr_html, to_html
from mech_vqa.explorer.html import CSP
from mech_vqa.explorer.payload import answer_tokens, rounded
from mech_vqa.methods.ablation import ablate, block_ablations, head_ablations
from mech_vqa.methods.head_claims import head_claims
from mech_vqa.methods.logit_lens import logit_lens
from mech_vqa.methods.mechanistic import explain
from mech_vqa.methods.raw_attention import answer_attention
from mech_vqa.methods.relevancy import relevancy
from mech_vqa.results import Explanation


def _payload(text: str) -> dict:
    found = re.search(r'<script type="application/json" id="[^"]+">(.*?)</script>', text, re.S)
    assert found, "the page carries no payload"
    return json.loads(found.group(1))


def test_rounded_keeps_four_significant_digits_of_the_largest_value():
    values = torch.tensor([[0.123456, -0.000123], [float("nan"), 0.05]])
    assert rounded(values) == [[0.1235, -0.0001], [None, 0.05]]
    assert rounded(torch.tensor(123456.7)) == 123457.0
    assert rounded(torch.zeros(2)) == [0.0, 0.0]


def test_explanation_html_is_small_self_contained_and_matches_the_result(organism_vqa, organism_answer, tmp_path):
    inp, box = organism_answer
    explanation = explain(organism_vqa, inp, inp.target(inp.answer_positions.numel() - 1), box=box, progress=False)
    path = tmp_path / "explanation.html"
    text = explanation.to_html(path)
    assert path.read_text(encoding="utf-8") == text
    assert path.stat().st_size < 2_000_000, f"{path.stat().st_size} bytes"
    assert CSP in text  # nothing may be fetched
    assert not re.search(r'(src|href)\s*=\s*["\'](?!data:|#)', text), "an attribute points outside the file"
    payload = _payload(text)
    assert [t["text"] for t in payload["tokens"]] == inp.str_tokens[inp.prompt_length:]
    selected = payload["per_token"][str(payload["selected"])]
    assert payload["tokens"][payload["selected"]]["text"] == explanation.target["token"]
    grid = torch.tensor(selected["maps"][0]["grid"])
    scale = float(explanation.patch_map.scores.abs().max())
    assert torch.allclose(grid, explanation.patch_map.scores, atol=1e-3 * scale)
    assert torch.allclose(torch.tensor(selected["heads"]["scores"]), explanation.heads.scores,
                          atol=1e-3 * float(explanation.heads.scores.abs().max()))
    assert selected["heads"]["top"] == list(explanation.heads.top_heads(1)[0])
    (layer, head), = explanation.positions.heads
    assert torch.allclose(torch.tensor(selected["head_maps"][f"{layer},{head}"]), explanation.positions.image_scores[0],
                          atol=1e-3 * scale)
    assert payload["box"] == [round(v, 2) for v in box]
    # a saved and loaded explanation gives the same page data
    explanation.save(tmp_path / "saved")
    assert _payload(Explanation.load(tmp_path / "saved").to_html())["per_token"] == payload["per_token"]


def test_answer_tokens_are_found_by_the_answer_text():
    tokens = ["<s>", "USER", ":", "▁What", "▁is", "▁it", "?", "▁red", "▁dog"]
    assert [t["text"] for t in answer_tokens(tokens, "red dog", None)] == [" red", " dog"]
    assert [t["position"] for t in answer_tokens(tokens, "red dog", None)] == [6, 7]
    assert answer_tokens(tokens, "something else", 7) == [{"text": " dog", "position": 7, "computed": False}]


def test_views_of_lens_ablation_and_a_generic_result(organism_vqa, organism_answer):
    inp, _ = organism_answer
    word = inp.str_tokens[-1]
    lens = logit_lens(organism_vqa, inp, word=word, k=3)
    payload = payload_of(lens)
    stage, row, col = 2, int(lens.rowcol[5, 0]), int(lens.rowcol[5, 1])
    assert [w for w, _ in payload["lens"]["cells"][stage][row][col]] == [
        t.replace("▁", " ") for t in lens.top_tokens[stage][5]]
    assert payload["per_token"]["0"]["maps"][0]["name"] == f"logit lens after layer {lens.n_layers - 1}"
    ablation = ablate(organism_vqa, inp, head_ablations(organism_vqa) + block_ablations(organism_vqa), progress=False)
    part = payload_of(ablation)["ablation"]
    grid = torch.tensor(part["head_grid"], dtype=torch.float32)
    assert torch.allclose(grid, ablation.head_grid(), atol=1e-3 * float(ablation.head_grid().abs().max()) + 1e-6)
    assert part["flipped"] == ablation.flipped.tolist()
    claims = head_claims(organism_vqa, inp, inp.target(), n=3)  # no linked view: summary, table and figure
    text = to_html(claims)
    assert "HeadClaims" in text and "<table" in text and "data:image/png;base64," in text


def test_notebook_view_leaves_out_large_parts_and_says_so(organism_vqa, organism_answer):
    inp, _ = organism_answer
    lens = logit_lens(organism_vqa, inp, k=5)
    full = repr_html(lens)
    assert "top-1 word per cell only" not in full and _payload(full)["lens"]["k"] == 5
    size = len(json.dumps(payload_of(lens), separators=(",", ":")))
    lighter = _payload(repr_html(lens, max_bytes=size - 1))
    assert lighter["lens"]["k"] == 1 and any("top-1 word" in note for note in lighter["notes"])
    assert "to_html" in repr_html(lens, max_bytes=1000) and 'type="application/json"' not in repr_html(lens, max_bytes=1000)
    assert "<html" not in lens._repr_html_() and 'class="mv-root"' in lens._repr_html_()  # a fragment, not a page


def test_answer_view_explains_every_token_and_saves_its_results(organism_vqa, organism_answer, tmp_path):
    inp, box = organism_answer
    view = answer_view(organism_vqa, inp, methods=["mechanistic", "raw_attention"], box=box, tokens=[0, 7])
    payload = view.to_payload()
    assert set(payload["per_token"]) == {"0", "7"}
    assert [t["computed"] for t in payload["tokens"]] == [i in (0, 7) for i in range(8)]
    heads = organism_vqa.adapter.n_layers * organism_vqa.adapter.n_heads
    assert len(payload["per_token"]["7"]["head_maps"]) == heads  # a small model: every head's map at once
    with pytest.raises(IndexError, match="out of range"):
        view.compute_token(8)
    written = view.save(tmp_path)
    assert {p.name for p in written} >= {"token7_explanation.json", "token7_raw_attention.json", "logit_lens.json"}


def test_raw_attention_and_relevancy_views_hold_each_tokens_maps(organism_vqa, organism_answer):
    inp, box = organism_answer
    attention = answer_attention(organism_vqa, inp, box=box)
    payload = payload_of(attention)
    assert [t["text"] for t in payload["tokens"]] == inp.str_tokens[inp.prompt_length:]
    last = len(attention.targets) - 1
    part = payload["per_token"][str(last)]
    head_map = attention.head_maps(2, tokens=[last])[0]
    assert torch.allclose(torch.tensor(part["head_maps"]["2,0"]), head_map, atol=1e-3 * float(head_map.max()))
    mass = attention.mass(tokens=[last]).of("image")
    assert torch.allclose(torch.tensor(part["heads"]["scores"]), mass, atol=1e-3)
    maps = payload_of(relevancy(organism_vqa, inp, progress=False, box=box))["per_token"][str(last)]["maps"]
    assert maps[0]["name"] == "relevancy (LLM)" and len(maps[0]["grid"]) == inp.geometry.grid[0]
