import pytest
import torch

from conftest import ANSWER, QUESTION, assert_same_state, head_zeroed_by_hand, hook_snapshot, model_state
from mech_vqa.methods.ablation import ablate, block_ablations, head_ablations, image_token_ablation
from mech_vqa.results import Result


def _logprobs(vqa, inp, interventions=()):
    with torch.no_grad(), vqa.trace([], interventions=interventions):
        logits = vqa.forward(inp).logits[0].float()
    positions = inp.answer_positions - 1
    lp = logits[positions].log_softmax(-1)
    return lp.gather(-1, inp.input_ids[0, inp.answer_positions, None])[:, 0], lp.argmax(-1)


def test_zero_head_sweep_equals_one_forward_per_head(tiny_vqa, prepared):
    ablations = head_ablations(tiny_vqa)
    result = ablate(tiny_vqa, prepared, ablations, batch_size=3, progress=False)
    clean, clean_argmax = _logprobs(tiny_vqa, prepared)
    torch.testing.assert_close(result.clean_logprob, clean, rtol=0, atol=1e-5)
    for index, ablation in enumerate(ablations):
        lp, argmax = _logprobs(tiny_vqa, prepared, ablation.interventions)
        torch.testing.assert_close(result.delta[index], lp - clean, rtol=0, atol=1e-5)
        assert bool(result.flipped[index]) == bool((argmax != clean_argmax).any())
    assert result.head_grid().shape == (2, 4) and not result.head_grid().isnan().any()


def test_zero_head_matches_hand_written_hook(tiny_vqa, prepared):
    layer, head = 0, 3
    with head_zeroed_by_hand(tiny_vqa, layer, head):
        expected, _ = _logprobs(tiny_vqa, prepared)
    clean, _ = _logprobs(tiny_vqa, prepared)
    result = ablate(tiny_vqa, prepared, head_ablations(tiny_vqa, layers=[layer], heads=[head]), progress=False)
    torch.testing.assert_close(result.delta[0], expected - clean, rtol=0, atol=1e-5)


def test_blocks_and_image_tokens_and_modes(tiny_vqa, prepared, image):
    reference = [tiny_vqa.prepare(image.rotate(a), QUESTION, ANSWER) for a in (90, 180)]
    source = reference[0]
    ablations = (block_ablations(tiny_vqa, mode="mean", reference=reference)
                 + block_ablations(tiny_vqa, layers=[1], mode="resample", source=source)
                 + head_ablations(tiny_vqa, layers=[1], mode="mean", reference=reference)
                 + [image_token_ablation(tiny_vqa, prepared, prepared.image_positions[:8], name="top half"),
                    image_token_ablation(tiny_vqa, prepared, prepared.image_positions[8:], mode="mean",
                                         reference=reference, name="bottom half (mean)"),
                    image_token_ablation(tiny_vqa, prepared, prepared.image_positions, mode="resample",
                                         source=source, name="all (resampled)")])
    result = ablate(tiny_vqa, prepared, ablations, batch_size=5, progress=False)
    clean, _ = _logprobs(tiny_vqa, prepared)
    for index, ablation in enumerate(ablations):
        lp, _ = _logprobs(tiny_vqa, prepared, ablation.interventions)
        torch.testing.assert_close(result.delta[index], lp - clean, rtol=0, atol=1e-5)
    # resampling every image token from the source gives exactly the source image's answer log-probs
    resampled = _logprobs(tiny_vqa, source)[0]
    torch.testing.assert_close(result.delta[-1] + clean, resampled, rtol=0, atol=1e-5)


def test_no_ablation_changes_nothing(tiny_vqa, prepared):
    ablation = head_ablations(tiny_vqa, layers=[0], heads=[0])[0]
    empty = type(ablation)("nothing", (), kind="none")
    result = ablate(tiny_vqa, prepared, [empty], progress=False)
    assert result.delta.abs().max() < 1e-5 and not result.flipped.any()


def test_result_roundtrip_and_views(tiny_vqa, prepared, tmp_path):
    result = ablate(tiny_vqa, prepared, head_ablations(tiny_vqa), progress=False)
    loaded = Result.load(result.save(tmp_path / "abl"))
    assert torch.equal(loaded.delta, result.delta) and loaded.names == result.names
    assert list(result.topk(3)["delta_logprob"]) == sorted(result.total.tolist())[:3]
    assert len(result.to_dataframe()) == 8
    fig, ax = result.plot()
    assert ax.get_xlabel() == "head"


def test_state_restored_and_bad_input(tiny_vqa, prepared):
    tiny_vqa.logits(prepared)
    hooks, state = hook_snapshot(tiny_vqa.model), model_state(tiny_vqa.model)
    ablate(tiny_vqa, prepared, block_ablations(tiny_vqa), progress=False)
    assert hook_snapshot(tiny_vqa.model) == hooks
    assert_same_state(state, model_state(tiny_vqa.model))
    with pytest.raises(ValueError, match="no ablations"):
        ablate(tiny_vqa, prepared, [])
    with pytest.raises(ValueError, match="needs reference"):
        head_ablations(tiny_vqa, mode="mean")
    with pytest.raises(ValueError, match="unknown ablation mode"):
        block_ablations(tiny_vqa, mode="noise")
    with pytest.raises(ValueError, match="image-token positions"):
        image_token_ablation(tiny_vqa, prepared, [0, 1])


def _at_rows(ablations, rows):
    """The same ablations restricted to sequence ``rows`` (the reference for the answer-row path)."""
    import dataclasses

    def restrict(edit):  # a resample value holds one row per position: keep the rows edited
        value = edit.value
        if value is not None and value.dim() == (3 if edit.site == "z" else 2):
            value = value[rows]
        return dataclasses.replace(edit, positions=rows, value=value)

    return [dataclasses.replace(a, interventions=tuple(restrict(e) for e in a.interventions)) for a in ablations]


def test_answer_row_path_equals_full_recomputation_of_answer_row_edits(any_vqa, image):
    """where='answer' (KV cache of the clean prefix, answer rows recomputed) equals the full-sequence
    run of the same ablations restricted to the answer rows, on every layout."""
    inp = any_vqa.prepare(image, QUESTION, ANSWER)
    rows = [t.position for t in inp.answer_targets()]
    source = any_vqa.prepare(image.rotate(90), QUESTION, ANSWER)
    ablations = (head_ablations(any_vqa) + block_ablations(any_vqa)
                 + block_ablations(any_vqa, layers=[1], blocks=("mlp",), mode="resample", source=source))
    fast = ablate(any_vqa, inp, ablations, batch_size=5, progress=False, where="answer")
    full = ablate(any_vqa, inp, _at_rows(ablations, rows), batch_size=5, progress=False)
    torch.testing.assert_close(fast.clean_logprob, full.clean_logprob, rtol=0, atol=1e-5)
    torch.testing.assert_close(fast.delta, full.delta, rtol=0, atol=1e-5)
    assert torch.equal(fast.flipped, full.flipped) and fast.info["where"] == "answer"
    assert fast.delta.abs().max() > 1e-3  # the ablations do change the answer


def test_answer_row_path_differs_from_full_sequence_ablation(tiny_vqa, prepared):
    """The two paths mean different things: ablating a layer-0 head everywhere also changes the
    earlier positions the answer reads from."""
    ablations = head_ablations(tiny_vqa, layers=[0])
    fast = ablate(tiny_vqa, prepared, ablations, progress=False, where="answer")
    full = ablate(tiny_vqa, prepared, ablations, progress=False)
    assert (fast.delta - full.delta).abs().max() > 1e-4


def test_answer_row_path_bad_input(tiny_vqa, prepared):
    image_edit = image_token_ablation(tiny_vqa, prepared, prepared.image_positions[:4])
    with pytest.raises(ValueError, match="where='full'"):
        ablate(tiny_vqa, prepared, [image_edit], progress=False, where="answer")
    with pytest.raises(ValueError, match="unknown where"):
        ablate(tiny_vqa, prepared, head_ablations(tiny_vqa), progress=False, where="everywhere")
    from mech_vqa import VQAModel
    from mech_vqa.backends import BackendNotSupported
    from mech_vqa.runner import AnswerRowRunner

    pytest.importorskip("nnsight")
    nns = VQAModel(tiny_vqa.model, tiny_vqa.processor, backend="nnsight")
    with pytest.raises(ValueError, match="where='full'"):   # the same check on whole forwards
        ablate(nns, prepared, [image_edit], progress=False, where="answer")
    with pytest.raises(BackendNotSupported, match="AnswerRowRunner .* nnsight backend"):
        AnswerRowRunner(nns, prepared)   # used directly it still calls decoder layers: hooks only
    hooks, state = hook_snapshot(tiny_vqa.model), model_state(tiny_vqa.model)
    ablate(tiny_vqa, prepared, head_ablations(tiny_vqa), progress=False, where="answer")
    assert hook_snapshot(tiny_vqa.model) == hooks
    assert_same_state(state, model_state(tiny_vqa.model))
