import torch

from conftest import hook_snapshot
from mech_vqa.hooks import HookSet
from mech_vqa.runner import ResidualCheckpoint, last_mlp_only_at


def _last_mlp_io(vqa, inp, rows=None):
    """The last MLP's input and output shapes and the model's logits, optionally trimmed to ``rows``."""
    seen, hooks = {}, HookSet()
    try:
        if rows is not None:
            last_mlp_only_at(hooks, vqa.adapter, rows)
        hooks.post(vqa.adapter.mlp(vqa.adapter.n_layers - 1),
                   lambda m, args, kwargs, out: seen.update(inp=args[0].shape, out=out.clone()))
        with torch.no_grad():
            logits = vqa.forward(inp).logits[0].float()
    finally:
        hooks.remove()
    return seen, logits


def test_last_mlp_runs_only_at_rows_and_is_exact_there(any_vqa, image):
    inp = any_vqa.prepare(image, "What is the color of the dog?", "The dog is red.")
    rows = inp.answer_positions - 1
    full, clean_logits = _last_mlp_io(any_vqa, inp)
    before = hook_snapshot(any_vqa.model)
    trimmed, logits = _last_mlp_io(any_vqa, inp, rows)
    assert hook_snapshot(any_vqa.model) == before
    assert trimmed["inp"][1] == rows.numel() and full["inp"][1] == inp.seq_len
    # later hooks see the full-length output: exact at the rows, zero elsewhere
    torch.testing.assert_close(trimmed["out"][0, rows], full["out"][0, rows], rtol=0, atol=1e-6)
    others = torch.ones(inp.seq_len, dtype=torch.bool)
    others[rows] = False
    assert trimmed["out"][0, others].abs().max() == 0
    torch.testing.assert_close(logits[rows], clean_logits[rows], rtol=0, atol=1e-5)


def test_run_from_equals_the_clean_forward_at_every_layer(tiny_vqa, prepared):
    positions = prepared.answer_positions - 1
    checkpoint = ResidualCheckpoint(tiny_vqa, prepared)
    clean = checkpoint.clean_logits[0, positions].log_softmax(-1)
    for layer in range(tiny_vqa.adapter.n_layers):
        resumed = checkpoint.run_from(layer, 2, positions)
        torch.testing.assert_close(resumed, clean.expand(2, -1, -1), rtol=0, atol=1e-5)


def test_answer_rows_joining_at_their_layers_equal_separate_runs(tiny_vqa, prepared):
    """A batch whose rows join at their own layers gives each row what a run from that layer gives."""
    import pytest

    from mech_vqa.interventions import Intervention
    from mech_vqa.runner import AnswerRowRunner

    positions = (prepared.answer_positions - 1).tolist()
    runner = AnswerRowRunner(tiny_vqa, prepared, positions)
    layers = [0, 0, 1, tiny_vqa.adapter.n_layers - 1]
    edits = [Intervention("z", layer, heads=row % tiny_vqa.adapter.n_heads, rows=(row,))
             for row, layer in enumerate(layers)]
    joined = runner.run_rows(0, len(layers), positions, edits, joins=layers)
    for row, layer in enumerate(layers):
        alone = runner.run_rows(layer, 1, positions, [Intervention("z", layer, heads=row % tiny_vqa.adapter.n_heads)])
        torch.testing.assert_close(joined[row], alone[0], rtol=0, atol=1e-5)
    logits = runner.run_rows(0, len(layers), positions, edits, joins=layers, log_softmax=False)
    torch.testing.assert_close(logits.log_softmax(-1), joined, rtol=0, atol=1e-5)
    torch.testing.assert_close(runner.clean_logits_at(positions), runner.clean_logits[0, positions], rtol=0, atol=0)
    with pytest.raises(ValueError, match="join later"):
        runner.run_rows(0, 2, positions, [Intervention("z", 0, heads=0, rows=(1,))], joins=[0, 1])
    with pytest.raises(ValueError, match="non-decreasing"):
        runner.run_rows(0, 2, positions, joins=[1, 0])
    with pytest.raises(ValueError, match="computed at rows"):
        runner.clean_logits_at([0])


def test_full_forward_answer_rows_equal_the_answer_row_runner(any_vqa, image):
    """FullForwardAnswerRows (whole forwards through vqa.trace, interventions cut to rows first..last,
    attention edges removed through the masks the layers receive) gives AnswerRowRunner's numbers on every
    layout: edits of all positions, per-head and explicit-position edits, rows joining late, per-head and
    all-head attention edits."""
    from conftest import ANSWER, QUESTION
    from mech_vqa.interventions import Intervention
    from mech_vqa.runner import AnswerRowRunner, FullForwardAnswerRows

    vqa = any_vqa
    inp = vqa.prepare(image, QUESTION, ANSWER)
    a = vqa.adapter
    positions = (inp.answer_positions - 1).tolist()
    first, last = positions[0] - 2, positions[-1]
    fast, whole = AnswerRowRunner(vqa, inp, positions), FullForwardAnswerRows(vqa, inp, positions)
    torch.testing.assert_close(whole.clean_logits_at(positions), fast.clean_logits_at(positions), rtol=0, atol=1e-5)
    generator = torch.Generator().manual_seed(0)
    top = a.n_layers - 1
    edits = [Intervention("z", 0, heads=[0, a.n_heads - 1], rows=(0,)),
             Intervention("z", top, heads=[1, 2], positions=[positions[0], last], mode="replace",
                          value=torch.randn(a.head_dim, generator=generator), rows=(1,)),
             Intervention("mlp_out", top, positions=[last], rows=(2,)),
             Intervention("resid_post", top, mode="replace", value=torch.randn(a.d_model, generator=generator),
                          rows=(2,))]
    joins = [0, top, top]
    expected = fast.run_rows(0, 3, positions, edits, first=first, joins=joins)
    got = whole.run_rows(0, 3, positions, edits, first=first, joins=joins)
    assert (expected - fast.clean_logits_at(positions).log_softmax(-1)).abs().max() > 1e-4   # the edits matter
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)

    count = last + 1 - first

    def blocked(layer, first_row, last_row):
        assert (first_row, last_row) == (first, last)
        mask = torch.rand(2, a.n_heads if layer == top else 1, count, last + 1, generator=generator) < 0.5
        mask[..., torch.arange(count), first + torch.arange(count)] = False   # every row keeps itself
        return mask

    state = generator.get_state()
    expected = fast.run_rows(0, 2, positions, first=first, blocked=blocked)
    generator.set_state(state)
    got = whole.run_rows(0, 2, positions, first=first, blocked=blocked)
    assert (expected - fast.clean_logits_at(positions).log_softmax(-1)).abs().max() > 1e-4
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_the_pending_prefix_belongs_to_the_thread_that_set_it():
    """An answer-row attention call takes the prefix its own thread's cache stand-in left, never one another
    thread left (runs on different models in different threads)."""
    import threading

    from mech_vqa.runner import _pending_prefix, _PrefixKeysValues

    keys, values = torch.ones(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)
    left, checked, seen = threading.Event(), threading.Event(), {}

    def other_thread():
        _PrefixKeysValues(keys, values).update(torch.ones(1, 2, 1, 4), torch.ones(1, 2, 1, 4))
        left.set()
        checked.wait(10)
        seen["own"] = _pending_prefix().pop()

    worker = threading.Thread(target=other_thread)
    worker.start()
    assert left.wait(10)
    assert _pending_prefix() == []  # this thread sees nothing of the other's
    checked.set()
    worker.join(10)
    torch.testing.assert_close(seen["own"][0], keys, rtol=0, atol=0)
    torch.testing.assert_close(seen["own"][1], values, rtol=0, atol=0)
