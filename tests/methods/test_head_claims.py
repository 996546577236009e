"""Head claims: the top heads of the log-prob increase, each zeroed, recomputed from the ablation sweep."""

import json
import math

import pytest
import torch
from conftest import assert_same_state, hook_snapshot, model_state
from scipy.stats import spearmanr

from mech_vqa.methods.ablation import ablate, head_ablations
from mech_vqa.methods.head_claims import head_claims
from mech_vqa.methods.mechanistic import head_increase
from mech_vqa.results import HeadClaims, Result


def test_claims_recompute_from_the_sweep_exactly(tiny_mha_vqa, image, tmp_path):
    from conftest import ANSWER, QUESTION

    vqa = tiny_mha_vqa
    inp = vqa.prepare(image, QUESTION, ANSWER)
    target = inp.target(3)
    vqa.logits(inp)
    before, hooks = model_state(vqa.model), hook_snapshot(vqa.model)
    claims = head_claims(vqa, inp, target, n=5)
    assert_same_state(before, model_state(vqa.model))
    assert hooks == hook_snapshot(vqa.model)
    # the claim: the five largest head-level increases, largest first
    scores = head_increase(vqa, inp, target).scores
    top = scores.flatten().sort(descending=True).indices[:5]
    assert [(l * scores.shape[1] + h) for l, h in zip(claims.layers, claims.heads)] == top.tolist()
    torch.testing.assert_close(claims.increase, scores.flatten()[top], rtol=0, atol=0)
    # the test: the same head ablations run as their own sweep, and inside the full sweep
    pairs = list(zip(claims.layers, claims.heads))
    by_name = {(a.layer, a.head): a for a in head_ablations(vqa)}
    same = ablate(vqa, inp, [by_name[p] for p in pairs], targets=[target], progress=False)
    assert torch.equal(claims.delta, same.delta[:, 0]) and torch.equal(claims.flipped, same.flipped)
    full = ablate(vqa, inp, list(by_name.values()), targets=[target], progress=False)
    index = [list(by_name).index(p) for p in pairs]
    torch.testing.assert_close(claims.delta, full.delta[index, 0], rtol=0, atol=1e-5)
    expected = spearmanr(claims.increase.numpy(), (-claims.delta).numpy()).statistic
    assert claims.spearman == pytest.approx(expected, abs=1e-9)
    # verbs
    frame = claims.to_dataframe()
    assert list(frame.rank_increase) == [1, 2, 3, 4, 5] and sorted(frame.rank_needed) == [1, 2, 3, 4, 5]
    assert frame.rank_needed[int((-claims.delta).argmax())] == 1
    assert len(claims.topk(2)) == 2
    assert json.loads(json.dumps(claims.to_record()))["heads"][0]["head"] == frame["head"][0]
    loaded = Result.load(claims.save(tmp_path / "claims"))
    assert isinstance(loaded, HeadClaims) and torch.equal(loaded.delta, claims.delta)
    fig, ax = claims.plot()
    assert "Spearman" in ax.get_title()
    every = head_claims(vqa, inp, target, n=None)
    assert len(every.names) == vqa.adapter.n_layers * vqa.adapter.n_heads
    with pytest.raises(ValueError, match="n must be"):
        head_claims(vqa, inp, target, n=0)


def test_claims_on_each_family_beyond_llava_are_heads_zeroed_by_hand(beyond_llava_vqa, wide_image):
    """On each family (InternVL and Idefics3 with their tiles, Gemma-3's post-norms): the claimed heads are
    the top of the head-level increase, and each one's delta is the log-prob change a plain o_proj pre-hook
    zeroing that head gives in an ordinary forward; the model is left as found."""
    from conftest import ANSWER, QUESTION, head_zeroed_by_hand

    vqa = beyond_llava_vqa
    inp = vqa.prepare(wide_image, QUESTION, ANSWER)
    target = inp.target(3)
    vqa.logits(inp)
    before, hooks = model_state(vqa.model), hook_snapshot(vqa.model)
    claims = head_claims(vqa, inp, target, n=3)
    assert_same_state(before, model_state(vqa.model))
    assert hooks == hook_snapshot(vqa.model)
    scores = head_increase(vqa, inp, target).scores
    n_heads = scores.shape[1]
    top = scores.flatten().sort(descending=True, stable=True).indices[:3]
    assert [layer * n_heads + head for layer, head in zip(claims.layers, claims.heads)] == top.tolist()
    torch.testing.assert_close(claims.increase, scores.flatten()[top], rtol=0, atol=0)

    def logprob():
        with torch.no_grad():
            return float(vqa.logits(inp)[0, target.position].float().log_softmax(-1)[target.token_id])

    clean = logprob()
    assert claims.clean_logprob == pytest.approx(clean, abs=1e-5)
    for i, (layer, head) in enumerate(zip(claims.layers, claims.heads)):
        with head_zeroed_by_hand(vqa, layer, head):
            assert float(claims.delta[i]) == pytest.approx(logprob() - clean, abs=1e-4)
    assert float(claims.delta.abs().max()) > 1e-3                          # some zeroing moved the answer
    expected = spearmanr(claims.increase.numpy(), (-claims.delta).numpy()).statistic
    assert claims.spearman == pytest.approx(expected, abs=1e-9)
    assert claims.names == [f"L{layer}H{head}" for layer, head in zip(claims.layers, claims.heads)]


def test_organism_ranking_names_heads_the_answer_does_not_need(organism_vqa, organism_eval_items):
    """On colour questions the scaffolded head L2H0 tops the increase and the answer needs it; among the
    next-ranked heads sits one whose zeroing leaves the answer word as it was."""
    from mech_vqa.tasks import answer_target

    vqa = organism_vqa
    rows = [r for r in organism_eval_items if r["family"] == "color"][:4]
    unneeded = 0
    for row in rows:
        inp = vqa.prepare(row["picture"], row["question"], row["answer"])
        claims = head_claims(vqa, inp, inp.target(answer_target(inp, row)), n=4)
        assert claims.names[0] == "L2H0" and float(claims.delta[0]) < -1.0, row["question"]
        unneeded += bool((claims.delta[1:].abs() < 0.05).any())
        assert math.isfinite(claims.spearman)
    assert unneeded >= len(rows) - 1
