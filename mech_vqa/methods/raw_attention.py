"""Raw attention maps of answer tokens over the image, after LVLM-Interpret.

Ben Melech Stan et al., "LVLM-Interpret: An Interpretability Tool for Large Vision-Language
Models", CVPR 2024 workshops (arXiv 2404.03118), "raw attention" views.

For an answer token ``y_t`` at sequence index ``a`` the predicting position is ``p = a - 1`` and
its attention row in layer ``l``, head ``h`` is

    A[l, h, t, s] = softmax_s( q_{l,h}(p) . k_{l,h}(s) * scaling + causal/padding mask )

Image maps are its columns at the image positions, laid on the patch grid by the adapter's
geometry: ``[layers, heads, targets, n_image] -> [..., rows, cols]``.

One forward serves every answer token: ``q`` is captured at the predicting positions only and
``k`` at all positions (``[layers, seq, kv_heads, head_dim]``), then the rows are recomputed
exactly with :func:`mech_vqa.capture.attention_rows` -- no eager attention, no ``[layers, heads,
seq, seq]`` tensor. The reference implementation instead generates with ``output_attentions``,
keeps every full matrix and hard-codes 576 image positions; here nothing about the grid is assumed.

Views (on :class:`~mech_vqa.results.attention.AnswerAttention`): mean / max / sum over heads, a
layer range and a set of answer tokens -> :class:`PatchMap`; per-head galleries; the heads x
layers share of attention on image / question / answer tokens (:class:`AttentionMass`); and the
reverse view, how much each answer token attends to chosen patches (:class:`PatchToText`).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from ..capture import attention_rows
from ..inputs import PreparedInput, Target
from ..results.attention import AnswerAttention, AttentionMass, PatchToText
from ..results.patch_map import PatchMap


def check_single_input(inp) -> PreparedInput:
    """These methods explain one sequence: a :class:`PreparedInput`, not a batch."""
    if not isinstance(inp, PreparedInput):
        raise TypeError(
            f"expected a PreparedInput (from VQAModel.prepare), got {type(inp).__name__}; "
            "explain batched items one at a time"
        )
    return inp


def resolve_targets(inp: PreparedInput, targets=None) -> list[Target]:
    """Targets to explain: None = every answer token; an int = that answer token; a Target; or a list."""
    if targets is None:
        return inp.answer_targets()
    if isinstance(targets, (int, Target)):
        targets = [targets]
    resolved = [t if isinstance(t, Target) else inp.target(int(t)) for t in targets]
    if not resolved:
        raise ValueError("no targets given: pass None (every answer token), answer indices or Target objects")
    for t in resolved:
        inp.check_position(t.position)
    return resolved


def logits_at(vqa, positions) -> tuple[dict, torch.Tensor | None]:
    """Forward kwargs computing logits only at ``positions`` (``logits_to_keep``), and those positions.

    Saves the ``[seq, vocab]`` projection (and its backward) at every other position. Returns
    ``({}, None)`` when the model's forward has no ``logits_to_keep``: then logits cover every position.
    """
    if "logits_to_keep" not in inspect.signature(vqa.model.forward).parameters:
        return {}, None
    kept = torch.as_tensor(positions, dtype=torch.long).flatten().unique()
    return {"logits_to_keep": kept.to(vqa.device)}, kept


def _layer_list(adapter, layers) -> list[int]:
    return [adapter.check_layer(int(i)) for i in (range(adapter.n_layers) if layers is None else layers)]


def answer_attention(vqa, inp: PreparedInput, targets=None, *, layers: Sequence[int] | None = None,
                     box=None) -> AnswerAttention:
    """Attention rows of the targets' predicting positions, ``[layers, heads, targets, seq]`` float32.

    Args:
        vqa: a :class:`~mech_vqa.model.VQAModel`.
        inp: one prepared input with its answer teacher-forced.
        targets: None (every answer token), answer indices, or :class:`Target` s.
        layers: model layers to keep (default all).
        box: ground-truth box to attach to the maps made from this result.
    """
    inp = check_single_input(inp)
    adapter = vqa.adapter
    targets = resolve_targets(inp, targets)
    layer_list = _layer_list(adapter, layers)
    positions = torch.tensor([t.position for t in targets])
    with torch.no_grad(), vqa.trace(["q", "k"], layers=layer_list, positions=positions) as cache:
        vqa.forward(inp, **logits_at(vqa, positions[-1:])[0])  # the logits are not used
    # All layers in one call: layers play the batch dimension (each with its scaling and window).
    q = torch.stack([cache["q", l][0] for l in layer_list])
    k = torch.stack([cache["k", l][0] for l in layer_list])
    mask = inp.attention_mask.to(q.device).expand(len(layer_list), -1)
    blocks = adapter.attention_blocks(inp.input_ids[0])  # Gemma-3's bidirectional image block, else None
    weights = attention_rows(adapter, layer_list, q, k, positions, mask, blocks=blocks)  # [L, H, T, S]
    geometry = inp.geometry
    return AnswerAttention(
        weights=weights.cpu(), layers=layer_list, targets=[t.to_dict() for t in targets],
        image_positions=geometry.positions.cpu(), image_rowcol=geometry.rowcol.cpu(), image_view=geometry.view.cpu(),
        image_boxes=geometry.boxes.cpu(),
        question_positions=inp.question_positions.cpu(), answer_positions=inp.answer_positions.cpu(),
        grid=list(geometry.grid), image_size=list(geometry.image_size),
        image=torch.from_numpy(inp.display_image()), str_tokens=list(inp.str_tokens),
        box=[float(v) for v in box] if box is not None else None,
        info={"model": vqa.name, "question": inp.question, "answer": inp.answer},
    )


def raw_attention_map(vqa, inp: PreparedInput, targets=None, *, layers: Sequence[int] | None = None,
                      heads: Sequence[int] | None = None, head_reduce: str = "mean", layer_reduce: str = "mean",
                      token_reduce: str = "mean", box=None, view: int = 0) -> PatchMap:
    """One :class:`PatchMap` of raw attention: heads, then ``layers``, then target tokens reduced
    (``view`` 1: LLaVA-NeXT's high-resolution tokens painted over the image)."""
    result = answer_attention(vqa, inp, targets, layers=layers, box=box)
    return result.patch_map(heads=heads, head_reduce=head_reduce, layer_reduce=layer_reduce,
                            token_reduce=token_reduce, view=view)


def attention_mass(vqa, inp: PreparedInput, targets=None, *, layers: Sequence[int] | None = None) -> AttentionMass:
    """Heads x layers share of the targets' attention on image / question / answer / other tokens."""
    return answer_attention(vqa, inp, targets, layers=layers).mass()


def patch_to_text(vqa, inp: PreparedInput, cells, targets=None, *, layers: Sequence[int] | None = None,
                  heads: Sequence[int] | None = None, head_reduce: str = "mean",
                  layer_reduce: str = "mean") -> PatchToText:
    """The reverse view: attention of each answer token to the chosen ``(row, col)`` patches."""
    result = answer_attention(vqa, inp, targets, layers=layers)
    return result.patch_to_text(cells, heads=heads, head_reduce=head_reduce, layer_reduce=layer_reduce)
