import pytest
import torch

from conftest import assert_same_state, head_zeroed_by_hand, hook_snapshot, model_state
from mech_vqa import Intervention, zero_block, zero_head


@torch.no_grad()
def test_empty_intervention_changes_nothing(tiny_vqa, prepared):
    plain = tiny_vqa.logits(prepared)
    with tiny_vqa.trace([], interventions=[]):
        assert torch.equal(tiny_vqa.forward(prepared).logits, plain)


@torch.no_grad()
def test_zero_head_equals_hand_written_hook(tiny_vqa, prepared):
    layer, head = 1, 2
    with head_zeroed_by_hand(tiny_vqa, layer, head):
        expected = tiny_vqa.logits(prepared)
    with tiny_vqa.trace([], interventions=[zero_head(layer, head)]):
        got = tiny_vqa.forward(prepared).logits
    assert torch.equal(got, expected)
    assert not torch.equal(got, tiny_vqa.logits(prepared))


@torch.no_grad()
def test_block_and_residual_edits_seen_by_capture(tiny_vqa, prepared):
    pos = prepared.image_positions[:4]
    value = torch.full((64,), 0.5)
    edits = [zero_block(0, "mlp"), Intervention("resid_pre", 1, positions=pos, mode="replace", value=value),
             Intervention("attn_out", 1, mode="mean", value=torch.ones(64))]
    with tiny_vqa.trace(["mlp_out", "resid_pre", "attn_out"], interventions=edits) as cache:
        tiny_vqa.forward(prepared)
    assert cache["mlp_out", 0].abs().max() == 0
    assert torch.equal(cache["resid_pre", 1][0, pos], value.expand(4, 64))
    assert torch.equal(cache["attn_out", 1], torch.ones_like(cache["attn_out", 1]))


@torch.no_grad()
def test_batched_rows_equal_one_at_a_time(tiny_vqa, prepared):
    edits = [zero_head(0, 1), zero_head(1, 3), zero_block(1, "attn")]
    single = []
    for edit in edits:
        with tiny_vqa.trace([], interventions=[edit]):
            single.append(tiny_vqa.forward(prepared).logits[0])
    batch = {k: v.repeat(len(edits), *[1] * (v.dim() - 1)) for k, v in prepared.model_inputs().items()}
    rowed = [Intervention(e.site, e.layer, heads=e.heads, rows=i) for i, e in enumerate(edits)]
    with tiny_vqa.trace([], interventions=rowed):
        batched = tiny_vqa.forward(batch).logits
    torch.testing.assert_close(batched, torch.stack(single), rtol=1e-5, atol=1e-6)


def test_bad_interventions(tiny_vqa, prepared):
    with pytest.raises(ValueError, match="unknown intervention site"):
        Intervention("embedding", 0)
    with pytest.raises(ValueError, match="needs a value"):
        Intervention("z", 0, mode="replace")
    with pytest.raises(ValueError, match="site 'z' only"):
        Intervention("mlp_out", 0, heads=1)
    with pytest.raises(IndexError, match="head 7 is out of range"):
        with tiny_vqa.trace([], interventions=[zero_head(0, 7)]):
            tiny_vqa.forward(prepared)


def test_intervention_error_leaves_model_clean(tiny_vqa, prepared):
    tiny_vqa.logits(prepared)
    hooks, state = hook_snapshot(tiny_vqa.model), model_state(tiny_vqa.model)
    with pytest.raises(IndexError):
        with tiny_vqa.trace(["z"], interventions=[Intervention("resid_pre", 0, positions=[500])]):
            tiny_vqa.forward(prepared)
    assert hook_snapshot(tiny_vqa.model) == hooks
    assert_same_state(state, model_state(tiny_vqa.model))
