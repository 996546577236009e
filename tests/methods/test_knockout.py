import pytest
import torch

from conftest import ANSWER, QUESTION, assert_leaves_model_as_found
from mech_vqa import VQAModel
from mech_vqa.hooks import HookSet, preserved_state
from mech_vqa.methods.knockout import centred_windows, group_positions, knockout
from mech_vqa.results import KnockoutResult, Result


def _knocked_by_hand(vqa, inp, source, target, layers, targets, head=None):
    """The reference: a whole eager forward whose attention masks get the dtype's minimum at the
    blocked (target query, source key) entries, as the authors' code does; summed target log-prob."""
    adapter = vqa.adapter
    hooks = HookSet()

    def block(module, args, kwargs):
        mask = kwargs["attention_mask"].clone()
        if head is not None:
            mask = mask.expand(-1, adapter.n_heads, -1, -1).clone()
        rows = torch.tensor(target)[:, None]
        cols = torch.tensor(source)[None, :]
        if head is None:
            mask[:, :, rows, cols] = torch.finfo(mask.dtype).min
        else:
            mask[:, head, rows, cols] = torch.finfo(mask.dtype).min
        return args, {**kwargs, "attention_mask": mask}

    with torch.no_grad(), preserved_state(vqa.model, eager=True):
        try:
            for layer in layers:
                hooks.pre(adapter.attn(layer), block)
            logits = vqa.forward(inp).logits[0].float()
        finally:
            hooks.remove()
    rows = torch.tensor([t.position for t in targets])
    ids = torch.tensor([t.token_id for t in targets])
    return logits[rows].log_softmax(-1).gather(-1, ids[:, None]).sum()


def test_knockout_equals_blocking_the_eager_mask_by_hand(any_vqa, image):
    inp = any_vqa.prepare(image, QUESTION, ANSWER)
    targets = inp.answer_targets()[:2]
    n_layers = any_vqa.adapter.n_layers
    windows = [(0, 1), (1, n_layers), (0, n_layers)]
    pairs = [("image", "question"), ("image", "last"), ("question", "last")]
    result = knockout(any_vqa, inp, pairs, windows=windows, targets=targets, batch_size=4, progress=False)
    assert result.relative_change.shape == (3, 3)
    for p, (source, target) in enumerate(pairs):
        for w, (start, stop) in enumerate(windows):
            expected = _knocked_by_hand(any_vqa, inp, group_positions(inp, source, targets),
                                        group_positions(inp, target, targets), range(start, stop), targets)
            torch.testing.assert_close(result.knocked_logprob[p, w], expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(result.relative_change, torch.expm1(result.knocked_logprob - result.clean_logprob))
    assert result.relative_change.abs().max() > 1e-3  # the knockouts do change the answer


def test_per_head_knockout_equals_hand_blocking(tiny_vqa, prepared):
    targets = [prepared.target(0)]
    result = knockout(tiny_vqa, prepared, [("image", "last")], windows=[(0, 2)], heads=True, targets=targets,
                      progress=False)
    assert result.relative_change.shape == (1, 1, tiny_vqa.adapter.n_heads)
    image, last = group_positions(prepared, "image", targets), group_positions(prepared, "last", targets)
    for head in range(tiny_vqa.adapter.n_heads):
        expected = _knocked_by_hand(tiny_vqa, prepared, image, last, range(2), targets, head=head)
        torch.testing.assert_close(result.knocked_logprob[0, 0, head], expected, rtol=0, atol=1e-5)


def test_knockout_of_nothing_is_the_clean_run(tiny_vqa, prepared):
    with torch.no_grad():
        logits = tiny_vqa.logits(prepared)[0].float()
    target = prepared.target(0)
    clean = logits[target.position].log_softmax(-1)[target.token_id]
    result = knockout(tiny_vqa, prepared, [([], "last"), ("image", [])], progress=False)
    assert torch.equal(result.relative_change, torch.zeros_like(result.relative_change))
    torch.testing.assert_close(result.clean_logprob, clean, rtol=0, atol=1e-6)


def test_image_knocked_out_of_everything_makes_the_answer_independent_of_the_image(any_vqa, image):
    from PIL import Image

    other = Image.new("RGB", image.size, (200, 30, 90))
    inputs = [any_vqa.prepare(picture, QUESTION, ANSWER) for picture in (image, other)]
    n_layers = any_vqa.adapter.n_layers
    # every text position (with a sliding window, a mid-image token sees only image tokens, so
    # blocking image -> image too would leave it nothing to attend to: an error, tested below)
    text = [p for p in range(inputs[0].seq_len) if p not in set(inputs[0].image_positions.tolist())]
    results = [knockout(any_vqa, inp, [("image", text)], windows=[(0, n_layers)], targets=inp.answer_targets(),
                        progress=False) for inp in inputs]
    assert not torch.equal(results[0].clean_logprob, results[1].clean_logprob)  # the images do matter
    assert torch.equal(results[0].knocked_logprob, results[1].knocked_logprob)


def test_batched_windows_equal_one_at_a_time(tiny_mha_vqa, image):
    inp = tiny_mha_vqa.prepare(image, QUESTION, ANSWER)
    batched = knockout(tiny_mha_vqa, inp, window=2, heads=True, batch_size=64, progress=False)
    assert batched.windows == [[0, 1], [0, 2], [1, 3]] and batched.anchors == [0, 1, 2]
    assert batched.info["runs"] < batched.relative_change.numel()
    for w, (start, stop) in enumerate(batched.windows):
        alone = knockout(tiny_mha_vqa, inp, windows=[(start, stop)], heads=True, batch_size=1, progress=False)
        torch.testing.assert_close(batched.knocked_logprob[:, w], alone.knocked_logprob[:, 0], rtol=0, atol=1e-5)


def test_windows_follow_the_paper():
    assert centred_windows(32, 9)[0] == (0, 5, 0) and centred_windows(32, 9)[16] == (12, 21, 16)
    assert centred_windows(32, 9)[31] == (27, 32, 31) and centred_windows(4, 1) == [(0, 1, 0), (1, 2, 1), (2, 3, 2),
                                                                                     (3, 4, 3)]


def test_bad_input_is_one_clear_error(tiny_vqa, prepared):
    with pytest.raises(ValueError, match="unknown token group 'picture'"):
        knockout(tiny_vqa, prepared, [("picture", "last")], progress=False)
    with pytest.raises(ValueError, match=r"window \(1, 1\) is empty"):
        knockout(tiny_vqa, prepared, windows=[(1, 1)], progress=False)
    with pytest.raises(ValueError, match=r"window \(1, 3\) reaches past the model's layers 0..1"):
        knockout(tiny_vqa, prepared, windows=[(1, 3)], progress=False)
    with pytest.raises(ValueError, match="window size 0 must lie in 1..2"):
        knockout(tiny_vqa, prepared, window=0, progress=False)
    with pytest.raises(ValueError, match=r"positions \[999\] fall outside"):
        knockout(tiny_vqa, prepared, [([999], "last")], progress=False)
    with pytest.raises(ValueError, match="no key to attend to"):
        knockout(tiny_vqa, prepared, [("all", "all")], progress=False)
    pytest.importorskip("nnsight")
    nns = VQAModel(tiny_vqa.model, tiny_vqa.processor, backend="nnsight")
    with pytest.raises(ValueError, match="no key to attend to"):   # raised inside the nnsight trace, same error
        knockout(nns, prepared, [("all", "all")], progress=False)


def test_model_left_as_found(tiny_vqa, prepared):
    assert_leaves_model_as_found(tiny_vqa, prepared, lambda inp: knockout(tiny_vqa, inp, heads=True, progress=False))


def test_result_roundtrip_views_and_plot(tiny_vqa, prepared, tmp_path):
    result = knockout(tiny_vqa, prepared, progress=False)
    loaded = Result.load(result.save(tmp_path / "knockout"))
    assert isinstance(loaded, KnockoutResult)
    assert torch.equal(loaded.relative_change, result.relative_change) and loaded.pairs == result.pairs
    frame = result.to_dataframe()
    assert len(frame) == 3 * 2 and set(frame.pair) == {"image ↛ question", "image ↛ last", "question ↛ last"}
    assert list(result.topk(2)["relative_change"]) == sorted(result.relative_change.flatten().tolist())[:2]
    assert result.strongest_window("image->last") in [tuple(w) for w in result.windows]
    fig, ax = result.plot()
    assert len(ax.get_lines()) == 3 + 1 and "layer" in ax.get_xlabel()
    fig.savefig(tmp_path / "knockout.png")
    mean = KnockoutResult.average([result, result])
    torch.testing.assert_close(mean.relative_change, result.relative_change)
    per_head = knockout(tiny_vqa, prepared, [("image", "last")], heads=True, progress=False)
    fig, ax = per_head.plot()
    assert ax.get_ylabel() == "head"


def _organism_items(organism_eval_items, n=4):
    return [row for row in organism_eval_items if row["family"] == "color"][:n]


def test_organism_image_reaches_the_answer_in_the_scaffolded_layer(organism_vqa, organism_eval_items):
    """The organism reads the queried object's colour with head L2H0 (its training scaffold): blocking
    image -> last in layer 2 destroys the answer, the same one-layer window anywhere else barely moves it."""
    from mech_vqa.tasks import answer_target

    for row in _organism_items(organism_eval_items):
        inp = organism_vqa.prepare(row["picture"], row["question"], row["answer"])
        target = inp.target(answer_target(inp, row))
        result = knockout(organism_vqa, inp, [("image", "last")], window=1, targets=[target], progress=False)
        change = result.relative_change[0]
        assert result.strongest_window(0) == (2, 3)
        assert change[2] < -0.5, (row["question"], change)
        others = torch.cat([change[:2], change[3:]])
        assert others.abs().max() < 0.1 and change[2] < others.min() - 0.4, (row["question"], change)


def test_eager_float_masks_give_the_sdpa_numbers(tiny_mistral_vqa, image):
    """Eager attention gets HF's additive float mask (here with a sliding window), SDPA a bool one or
    none: the knockout edits either form and both give the same numbers."""
    inp = tiny_mistral_vqa.prepare(image, QUESTION, ANSWER)
    pairs = [("image", "question"), ("image", "last"), ("question", "last")]
    sdpa = knockout(tiny_mistral_vqa, inp, pairs, windows=[(0, 1), (1, 2), (0, 2)], progress=False)
    with preserved_state(tiny_mistral_vqa.model, eager=True):
        eager = knockout(tiny_mistral_vqa, inp, pairs, windows=[(0, 1), (1, 2), (0, 2)], progress=False)
    torch.testing.assert_close(eager.knocked_logprob, sdpa.knocked_logprob, rtol=0, atol=1e-5)
    assert sdpa.relative_change.abs().max() > 1e-3
