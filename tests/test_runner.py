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
