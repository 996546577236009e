"""Ablation studies: knock out heads, attention / MLP blocks or image tokens and measure the answer.

For answer targets ``y_t`` (teacher-forced, predicted at position ``t``) and an ablation ``a``::

    delta[a, t] = log p_a(y_t | prefix) - log p(y_t | prefix)        (fp32 log-softmax)
    flipped[a]  = argmax_a at any target position != the clean argmax there

Ablation modes (per Wang et al. 2022 / Heimersheim & Nanda 2024 on activation patching):
``zero`` writes zeros; ``mean`` writes the mean activation over a reference set of inputs (and
over their positions); ``resample`` writes the activation of another input of the same length.

Batched: every ablation gets its own batch row; ablations are grouped by the first layer they touch
and each group runs from that layer on, from the clean run's residual stream
(:class:`~mech_vqa.runner.ResidualCheckpoint`), so the vision tower and the earlier layers are
never recomputed, and only the target positions are unembedded.

Where (``ablate(..., where=...)``):

- ``"full"`` (default): the ablation applies at every position its interventions name (all, for
  head and block ablations), so from the ablated layer on every later position's keys and values
  change too: the answer sees the ablated component's effect on the whole context.
- ``"answer"``: the ablation applies at the answer rows only (the rows predicting the targets, and
  any row between them); every earlier position keeps its clean residual stream, keys and values
  at every layer. The clean run is kept as a KV cache and only the answer rows are recomputed per
  ablation (:class:`~mech_vqa.runner.AnswerRowRunner`), a decoding step's arithmetic instead of a
  forward's; ablations of different layers share a batch (each pass then reads every weight once).
  It measures the component's *direct* role at the answer position (what the answer row itself
  reads and writes through it), not its effect through the context. An ablation that
  edits an earlier position (an image-token ablation) cannot run this way and is an error.
"""

from __future__ import annotations

import dataclasses
import time
from collections import defaultdict
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..interventions import Intervention
from ..results.ablation import AblationResult
from ..runner import answer_rows_for, checkpoint_for

MODES = ("zero", "mean", "resample")
WHERE = ("full", "answer")


@dataclasses.dataclass(frozen=True)
class Ablation:
    """A named set of interventions applied together (one batch row of a sweep)."""

    name: str
    interventions: tuple[Intervention, ...]
    layer: int = -1
    head: int = -1
    kind: str = ""

    @property
    def first_layer(self) -> int:
        return min(edit.layer for edit in self.interventions) if self.interventions else 0


def _check_mode(mode: str, reference, source) -> None:
    if mode not in MODES:
        raise ValueError(f"unknown ablation mode {mode!r}; choose one of {MODES}")
    if mode == "mean" and not reference:
        raise ValueError("mode='mean' needs reference=[prepared inputs] to average over")
    if mode == "resample" and source is None:
        raise ValueError("mode='resample' needs source=<prepared input> to take activations from")


def _site_values(vqa, site: str, layers: Sequence[int], mode: str, reference, source, seq_len: int) -> dict:
    """Per-layer replacement values for ``mean`` / ``resample`` (None for ``zero``)."""
    if mode == "zero":
        return {layer: None for layer in layers}
    if mode == "resample":
        if source.seq_len != seq_len:
            raise ValueError(
                f"resample source has {source.seq_len} tokens, the input {seq_len}; resampling writes position "
                "by position, so use a source built from the same template and answer length"
            )
        with torch.no_grad(), vqa.trace([site], layers=layers) as cache:
            vqa.forward(source)
        return {layer: cache[site, layer][0] for layer in layers}
    sums, count = {}, 0
    with torch.no_grad():
        for item in reference:
            with vqa.trace([site], layers=layers) as cache:
                vqa.forward(item)
            for layer in layers:
                total = cache[site, layer][0].float().sum(0)
                sums[layer] = sums.get(layer, 0) + total
            count += item.seq_len
    return {layer: (sums[layer] / count) for layer in layers}


def head_ablations(vqa, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None, *,
                   mode: str = "zero", reference=None, source=None, seq_len: int | None = None) -> list[Ablation]:
    """One ablation per (layer, head): its output ``z`` before ``o_proj`` at every position."""
    _check_mode(mode, reference, source)
    adapter = vqa.adapter
    layers = list(range(adapter.n_layers)) if layers is None else [adapter.check_layer(x) for x in layers]
    heads = list(range(adapter.n_heads)) if heads is None else [adapter.check_head(h) for h in heads]
    values = _site_values(vqa, "z", layers, mode, reference, source, seq_len or (source.seq_len if source else 0))
    out = []
    for layer in layers:
        for head in heads:
            value = None if values[layer] is None else values[layer][..., head:head + 1, :]
            edit = Intervention("z", layer, heads=head, mode="zero" if value is None else "replace", value=value)
            out.append(Ablation(f"L{layer}H{head}", (edit,), layer=layer, head=head, kind="head"))
    return out


def block_ablations(vqa, layers: Sequence[int] | None = None, blocks: Sequence[str] = ("attn", "mlp"), *,
                    mode: str = "zero", reference=None, source=None) -> list[Ablation]:
    """One ablation per (layer, block): the whole attention or MLP output."""
    _check_mode(mode, reference, source)
    adapter = vqa.adapter
    layers = list(range(adapter.n_layers)) if layers is None else [adapter.check_layer(x) for x in layers]
    out = []
    for block in blocks:
        if block not in ("attn", "mlp"):
            raise ValueError(f"block must be 'attn' or 'mlp', got {block!r}")
        site = f"{block}_out"
        values = _site_values(vqa, site, layers, mode, reference, source, source.seq_len if source else 0)
        for layer in layers:
            value = values[layer]
            edit = Intervention(site, layer, mode="zero" if value is None else "replace", value=value)
            out.append(Ablation(f"L{layer}.{block}", (edit,), layer=layer, kind=block))
    return out


def image_token_ablation(vqa, inp, positions: Sequence[int] | torch.Tensor, *, name: str = "image tokens",
                         mode: str = "zero", reference=None, source=None) -> Ablation:
    """Replace the embeddings of chosen image tokens (the input of layer 0) by zero / mean / resample.

    ``mean`` averages the image-token embeddings of the reference inputs.
    """
    _check_mode(mode, reference, source)
    positions = torch.as_tensor(positions, dtype=torch.long).flatten()
    image = set(inp.image_positions.tolist())
    if not set(positions.tolist()) <= image:
        raise ValueError("image_token_ablation positions must be image-token positions (inp.image_positions)")
    value = None
    if mode == "mean":
        rows = []
        with torch.no_grad():
            for item in reference:
                with vqa.trace(["resid_pre"], layers=[0]) as cache:
                    vqa.forward(item)
                rows.append(cache["resid_pre", 0][0, item.image_positions].float())
        value = torch.cat(rows).mean(0)
    elif mode == "resample":
        with torch.no_grad(), vqa.trace(["resid_pre"], layers=[0]) as cache:
            vqa.forward(source)
        # the same patch of the other image: match by index on the patch grid, not by sequence position
        own_index = {int(p): i for i, p in enumerate(inp.image_positions)}
        value = cache["resid_pre", 0][0, source.image_positions[[own_index[int(p)] for p in positions]]]
    edit = Intervention("resid_pre", 0, positions=positions, mode="zero" if value is None else "replace", value=value)
    return Ablation(name, (edit,), layer=0, kind="image")


def ablate(vqa, inp, ablations: Sequence[Ablation], *, targets=None, batch_size: int = 16,
           progress: bool = True, where: str = "full") -> AblationResult:
    """Run every ablation on ``inp`` and measure the answer targets (default: all answer tokens).

    ``where``: ``"full"`` ablates at every position the ablation names, ``"answer"`` at the answer
    rows only, recomputing nothing else on the hooks backend (whole forwards with the same numbers on
    others; see the module docstring for the difference in meaning).
    """
    if where not in WHERE:
        raise ValueError(f"unknown where={where!r}; choose one of {WHERE}")
    if not ablations:
        raise ValueError("no ablations given; build them with head_ablations / block_ablations / image_token_ablation")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    targets = list(targets) if targets is not None else inp.answer_targets()
    if not targets:
        raise ValueError("no targets: prepare the input with an answer")
    start = time.perf_counter()
    positions = torch.tensor([t.position for t in targets])
    token_ids = torch.tensor([t.token_id for t in targets])
    if where == "answer":
        checkpoint = answer_rows_for(vqa, inp, positions)  # whole forwards on backends other than hooks
        run = checkpoint.run_rows
    else:
        checkpoint = checkpoint_for(vqa, inp, positions)  # whole forwards on backends other than hooks
        run = checkpoint.run_from
    clean = checkpoint.clean_logits_at(positions).log_softmax(-1)
    clean_lp = clean.gather(-1, token_ids[:, None].to(clean.device))[:, 0].cpu()
    clean_argmax = clean.argmax(-1).cpu()

    if where == "answer":
        # a chunk mixes layers (sorted; each row joins the pass at its own layer): the answer rows cost
        # little per layer, while each pass reads every weight after its first layer once
        order = sorted(range(len(ablations)), key=lambda index: ablations[index].first_layer)
        chunks = [(ablations[members[0]].first_layer, members)
                  for members in (order[i:i + batch_size] for i in range(0, len(order), batch_size))]
    else:
        groups: dict[int, list[int]] = defaultdict(list)
        for index, ablation in enumerate(ablations):
            groups[ablation.first_layer].append(index)
        chunks = [(layer, members[i:i + batch_size]) for layer, members in sorted(groups.items())
                  for i in range(0, len(members), batch_size)]
    delta = torch.zeros(len(ablations), len(targets))
    argmax = torch.zeros(len(ablations), len(targets), dtype=torch.long)
    for layer, members in tqdm(chunks, desc="ablations", disable=not progress):
        edits = [dataclasses.replace(edit, rows=(row,)) for row, index in enumerate(members)
                 for edit in ablations[index].interventions]
        if where == "answer":  # rows join at their first layer; the target's log-prob from one logsumexp
            logits = run(layer, len(members), positions, edits, joins=[ablations[i].first_layer for i in members],
                         log_softmax=False)
            index = token_ids.view(1, -1, 1).expand(len(members), -1, 1).to(logits.device)
            chosen = (logits.gather(-1, index)[..., 0] - logits.logsumexp(-1)).cpu()
            argmax[members] = logits.argmax(-1).cpu()
        else:
            logprobs = run(layer, len(members), positions, edits).cpu()
            chosen = logprobs.gather(-1, token_ids.view(1, -1, 1).expand(len(members), -1, 1))[..., 0]
            argmax[members] = logprobs.argmax(-1)
        delta[members] = chosen - clean_lp
    flipped = (argmax != clean_argmax).any(-1)
    return AblationResult(
        delta=delta, clean_logprob=clean_lp, flipped=flipped, ablated_argmax=argmax,
        names=[a.name for a in ablations], layers=[a.layer for a in ablations], heads=[a.head for a in ablations],
        kinds=[a.kind for a in ablations], targets=[t.to_dict() for t in targets],
        info={"model": vqa.name, "prompt": inp.prompt, "answer": inp.answer, "batch_size": batch_size, "where": where,
              "n_layers": vqa.adapter.n_layers, "n_heads": vqa.adapter.n_heads,
              "runtime_s": time.perf_counter() - start},
    )
