"""Mechanistic log-probability increases of layers, heads and source positions.

Yu & Ananiadou 2024, "Understanding Multimodal LLMs: the Mechanistic Interpretability of Llava in
Visual Question Answering" (arXiv 2411.10950). For a target token ``y`` predicted at position ``t``
and ``x_l`` ``[d]`` the residual stream entering layer ``l`` at ``t``, with ``lp`` the frozen-norm
log-probability of :mod:`mech_vqa.methods.logprob`:

* layer level:    ``attn_l = lp(x_l + a_l) - lp(x_l)``;  ``mlp_l = lp(x_l + a_l + m_l) - lp(x_l + a_l)``
  (``a_l``, ``m_l`` ``[d]`` the attention and MLP block outputs at ``t``);
* head level:     ``h_lj = z_lj[t] @ W_O[j]`` (``z`` ``[H, hd]``, ``W_O`` ``[H, hd, d]``),
  ``increase_lj = lp(x_l + h_lj) - lp(x_l)`` for every layer and head;
* position level: ``h_ljp = A_lj[t, p] * v_lj[p] @ W_O[j]`` (values repeated per GQA group),
  ``increase_p = lp(x_l + h_ljp) - lp(x_l)`` for every source position ``p``, computed only for the
  heads asked. The image part, laid on the patch grid by the adapter, is the patch heatmap.

Everything comes from ONE forward that records, at ``t`` only, ``resid_pre``, ``attn_out``,
``mlp_out``, ``z``, ``q``, ``mlp_act`` (for neurons only) and the last ``resid_post``, plus ``k`` and
``v`` at all positions (under sdpa, ``q``, ``k``, ``v`` and ``z`` as the attention function reads and
returns them; under another attention, the attention block's input, projected for the layers read).
Attention rows are recomputed from ``q`` and ``k`` (:func:`~mech_vqa.capture.attention_rows`), so no
eager attention and no second forward. The forward asks the model for the logits of the last
position only (``logits_to_keep=1``): nothing here needs the others.

Entry point: :func:`explain` ("explain this answer token"); :func:`capture_target` +
:func:`layer_and_head_increase` / :func:`position_increase` for finer control.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..adapters.base import module_parameter
from ..capture import ActivationCache, PerLayer, attention_rows
from ..hooks import float32, without_grad
from ..inputs import BatchedInput, PreparedInput, Target, check_box
from ..results.mechanistic import Explanation, HeadIncrease, HeadPositions, LayerIncrease
from ..tensor_parallel import call_on_whole
from .logprob import CHUNK_ELEMENTS, FrozenNormScorer, check_token_ids

#: float32 elements of W_O converted at once when forming head vectors (8 MiB)
HEAD_CHUNK_ELEMENTS = 1 << 21

CAPTURED = ("resid_pre", "attn_out", "mlp_out", "z", "q", "mlp_act", "resid_post")  # at t; k, v at every position


@dataclass
class TargetCapture:
    """What one forward records for the attributions (``B`` rows, one target each).

    ``resid_pre``/``attn_out``/``mlp_out`` ``[B, L, d]``, ``z``/``q`` ``[B, L, H, hd]`` and
    ``mlp_act`` ``[B, L, d_mlp]`` are at each row's target position; ``k``/``v`` are per-layer lists of
    ``[B, S, KV, hd]`` (None for layers not kept, see ``kv_layers``); ``final`` ``[B, d]`` the last layer's output at ``t``. ``positions`` ``[B]`` are
    batch coordinates of ``t``; ``offsets`` ``[B]`` the left padding of each row.

    Queries, keys and values stay in ``cache`` as recorded: as the attention function read them (sdpa),
    or as the attention input, then projected and rotated when first read, one layer at a time
    (:meth:`query`, ``k[layer]``, ``v[layer]``): the top head's map needs one layer's, not all of them.
    """

    vqa: object
    items: list[PreparedInput]
    targets: list[Target]
    positions: torch.Tensor
    offsets: torch.Tensor
    attention_mask: torch.Tensor
    resid_pre: torch.Tensor
    attn_out: torch.Tensor
    mlp_out: torch.Tensor
    z: torch.Tensor
    cache: ActivationCache
    kv_layers: list[int]
    mlp_act: torch.Tensor | None
    final: torch.Tensor
    model_logprob: torch.Tensor
    scorer: FrozenNormScorer
    #: ``[B, S]`` bidirectional blocks of the attention mask (Gemma-3's images), None = causal
    attention_blocks: torch.Tensor | None = None
    #: whether ``attention_mask`` masks any key (padding): else attention rows need no padding mask
    padded: bool = True

    @property
    def adapter(self):
        return self.vqa.adapter

    def query(self, layer: int) -> torch.Tensor:
        """``[B, H, hd]``: layer ``layer``'s rotated queries at ``t``."""
        return self.cache["q", layer][:, 0]

    @property
    def q(self) -> torch.Tensor:
        """``[B, L, H, hd]``: every layer's rotated queries at ``t``."""
        return self.cache.stack("q").transpose(0, 1)[:, :, 0]

    @property
    def k(self) -> PerLayer:
        """``k[layer]``: ``[B, S, KV, hd]`` rotated keys, or None where not kept."""
        return PerLayer(self.cache, "k", self.kv_layers, self.adapter.n_layers)

    @property
    def v(self) -> PerLayer:
        """``v[layer]``: ``[B, S, KV, hd]`` values, or None where not kept."""
        return PerLayer(self.cache, "v", self.kv_layers, self.adapter.n_layers)

    def frozen_output_norm(self, layer: int, block: str = "attn"):
        """``(scale [B, 1], gain [d])`` of layer ``layer``'s post-norm at ``t`` (None without one): the
        raw block output is rebuilt from what was captured at ``t`` (``z`` through ``o_proj``, or
        ``mlp_act`` through ``down_proj``), as the model computed it before its norm."""
        adapter = self.adapter
        if adapter.output_norm(layer, block) is None:
            return None
        if block == "attn":
            module, inputs = adapter.o_proj(layer), self.z[:, layer].flatten(-2)
        else:
            if self.mlp_act is None:
                raise ValueError("the MLP's post-norm scale needs mlp_act; capture with capture_target(..., mlp_act=True)")
            module, inputs = adapter.down_proj(layer), self.mlp_act[:, layer]
        with torch.no_grad():
            raw = call_on_whole(module, inputs)
        return adapter.frozen_output_norm(layer, block, raw)

    def meta(self, row: int) -> dict:
        """Metadata for row ``row``'s results (model id, prompt, target)."""
        return _meta(self.vqa, self.items[row], self.targets[row])


def _meta(vqa, item: PreparedInput, target: Target) -> dict:
    return {"model": vqa.name, "prompt": item.prompt, "target": target.to_dict(),
            "info": {"question": item.question, "answer": item.answer}}


def _check_target(inp: PreparedInput, adapter, target: Target) -> Target:
    if not isinstance(target, Target):
        raise TypeError(f"target must be a mech_vqa Target (e.g. inp.target()), got {type(target).__name__}")
    if not isinstance(target.token_id, int) or not 0 <= target.token_id < adapter.vocab_size:
        check_token_ids(adapter, [target.token_id])  # its error (or the id as a tensor / numpy int: fine)
    inp.check_position(target.position)
    return Target(target.token_id, target.position % inp.seq_len, target.token)


def _targets(vqa, inp, target) -> tuple[list[PreparedInput], list[Target], torch.Tensor]:
    """Rows, one checked target per row, and the left padding of each row."""
    if isinstance(inp, BatchedInput):
        items, offsets = inp.items, inp.offsets
        targets = [item.target() for item in items] if target is None else list(target)
        if len(targets) != len(items):
            raise ValueError(f"a batch of {len(items)} rows needs one target per row, got {len(targets)}")
    elif isinstance(inp, PreparedInput):
        items, offsets = [inp], torch.zeros(1, dtype=torch.long)
        targets = [inp.target() if target is None else target]
    else:
        raise TypeError("inp must be a PreparedInput or BatchedInput (vqa.prepare / vqa.batch), "
                        f"got {type(inp).__name__}")
    return items, [_check_target(i, vqa.adapter, t) for i, t in zip(items, targets)], offsets


def target_trace(vqa, positions: torch.Tensor, kv_layers: list[int], mlp_act: bool = True):
    """The trace :func:`capture_target` runs its forward in: everything in ``CAPTURED`` at ``positions``
    ``[B]`` (one per row) in every layer but ``resid_post`` (last layer only), keys and values at every
    position in ``kv_layers``; ``mlp_act`` (what the neuron attribution reads) only if asked. One
    trace: one set-up, at most one hook per module and kind."""
    names = [n for n in CAPTURED if mlp_act or n != "mlp_act"] + (["k", "v"] if kv_layers else [])
    layers = {"resid_post": [vqa.adapter.n_layers - 1]} | ({"k": kv_layers, "v": kv_layers} if kv_layers else {})
    return vqa.trace(names, layers=layers, positions=positions if positions.numel() == 1 else positions.view(-1, 1))


@without_grad
def capture_target(vqa, inp: PreparedInput | BatchedInput, target=None, *, kv_layers="all", mlp_act: bool = True,
                   chunk_elements: int = CHUNK_ELEMENTS) -> TargetCapture:
    """One forward recording everything the attributions need at each row's target position.

    ``target``: a :class:`~mech_vqa.inputs.Target` (default ``inp.target()``, the first answer
    token), or for a :class:`BatchedInput` a list with one per row (positions in the row's own
    coordinates). ``kv_layers``: layers whose keys and values are kept at every position, which
    only position-level maps need (``"all"``, a list, or None): at LLaVA-1.5-7B's size they are
    ~10 MB per layer, so head- and layer-level attributions keep none. ``mlp_act``: also record the
    MLP's hidden activations at ``t`` (the neuron attribution's input; else ``mlp_act`` is None).
    """
    adapter = vqa.adapter
    items, targets, offsets = _targets(vqa, inp, target)
    rows = [t.position + offset for t, offset in zip(targets, offsets.tolist())]  # batch coordinates
    positions = torch.tensor(rows)
    layers = range(adapter.n_layers)
    kv = list(layers) if kv_layers == "all" else sorted({adapter.check_layer(int(x)) for x in (kv_layers or [])})
    # logits only at each row's t: the model's own log p(y | t) comes out of the same forward (where
    # every t is the last position, HF's own "last n" slice; else an index per row)
    last = all(row == inp.input_ids.shape[1] - 1 for row in rows)
    with target_trace(vqa, positions, kv, mlp_act=mlp_act) as cache, vqa.backend.read_only():
        logits = vqa.forward(inp, logits_to_keep=1 if last else positions.view(-1, 1).to(vqa.device)).logits[:, 0]

    store = cache._store  # (at t, never waiting for a rotation: read past the cache's pending-work check)

    def stacked(name):  # [B, L, ...] at t: each layer's capture is [B, 1, ...]
        return torch.cat([store[name, layer] for layer in layers], dim=1)

    final = store["resid_post", adapter.n_layers - 1][:, 0]
    scorer = FrozenNormScorer(adapter, final, [t.token_id for t in targets], chunk_elements=chunk_elements)
    log_probs = float32(logits).log_softmax(-1)
    model_logprob = log_probs.select(1, scorer._only_target) if scorer._only_target is not None \
        else log_probs.gather(1, scorer.targets.view(-1, 1).to(logits.device))[:, 0]
    mask = inp.attention_mask
    device = adapter.device
    mask = mask if mask.device == device else mask.to(device)
    padded = len(items) > 1 or items[0].has_padding()
    blocks = adapter.attention_blocks(inp.input_ids)
    return TargetCapture(
        vqa=vqa, items=items, targets=targets, positions=positions, offsets=offsets, attention_mask=mask,
        resid_pre=stacked("resid_pre"), attn_out=stacked("attn_out"), mlp_out=stacked("mlp_out"),
        z=stacked("z"), cache=cache, kv_layers=kv,
        mlp_act=stacked("mlp_act") if mlp_act else None,
        final=final,
        model_logprob=model_logprob,
        scorer=scorer,
        attention_blocks=None if blocks is None else blocks.to(adapter.device),
        padded=padded,
    )


@without_grad
def head_vectors(capture: TargetCapture, out: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, L, H, d]`` float32: what each head writes at ``t``, ``h_lj = z_lj @ W_O[j]``.

    Where a post-norm follows the attention (Gemma-3), ``h_lj = (z_lj @ W_O[j]) * s_l * gain_l``
    with the norm's scale ``s_l`` frozen at the forward's value: the heads then sum to ``attn_out``.
    ``out``: a ``[B, L, H, d]`` float32 tensor to ADD the head vectors into (saves a copy).
    """
    adapter = capture.adapter
    batch, n_layers, n_heads, _ = capture.z.shape
    out = capture.z.new_zeros((batch, n_layers, n_heads, adapter.d_model), dtype=torch.float32) if out is None else out
    # W_O goes to float32 a few heads at a time: a whole 7B layer's would be a 64 MiB copy, and all
    # layers' gigabytes, for a product worth a few milliseconds.
    step = max(1, HEAD_CHUNK_ELEMENTS // (adapter.head_dim * adapter.d_model))
    if step >= n_layers * n_heads and out.stride(1) == n_heads * out.stride(2) and \
            all(adapter.output_norm(layer, "attn") is None for layer in range(n_layers)):
        # every layer's W_O fits in one chunk (a small model): all heads of all layers in one product,
        # [L*H, B, d] += [L*H, B, hd] @ [L*H, hd, d] (a view of ``out``, whose layer and head axes merge)
        out.permute(1, 2, 0, 3).flatten(0, 1).baddbmm_(float32(capture.z).permute(1, 2, 0, 3).flatten(0, 1),
                                                       _stacked_W_O(adapter))
        return out
    for layer in range(n_layers):
        W_O = adapter.W_O(layer)
        frozen = capture.frozen_output_norm(layer, "attn")
        target = out[:, layer] if frozen is None else torch.zeros_like(out[:, layer])
        # [h, B, d] += [h, B, hd] @ [h, hd, d], in place in ``out``: every head in one product when they fit
        if step >= n_heads:
            target.transpose(0, 1).baddbmm_(capture.z[:, layer].float().transpose(0, 1), W_O.float())
        else:
            for start in range(0, n_heads, step):
                heads = slice(start, start + step)
                target[:, heads].transpose(0, 1).baddbmm_(capture.z[:, layer, heads].float().transpose(0, 1),
                                                          W_O[heads].float())
        if frozen is not None:
            scale, gain = frozen
            out[:, layer].addcmul_(target, scale.view(batch, 1, 1) * gain)
    return out


def _stacked_W_O(adapter) -> torch.Tensor:
    """``[L*H, head_dim, d_model]`` float32, contiguous: every layer's W_O stacked (a small model's, as
    :func:`head_vectors` uses it). Kept on the adapter while each layer's o_proj weight is the same
    tensor with the same storage, unmodified (its version counter moves with every in-place edit, an
    ablation's say; ``.to()`` swaps the storage): a stack and a strided copy per call would cost more
    than the product."""
    modules = [adapter.o_proj(layer) for layer in range(adapter.n_layers)]
    weights = [module_parameter(module, "weight") for module in modules]
    if any(weight is not module._parameters.get("weight") or weight.is_inference()
           for weight, module in zip(weights, modules)):
        # copies made for this read (gathered across a tensor-parallel group, loaded back from an offload),
        # or weights without a version counter: nothing to keep
        return adapter.W_O_all().float().flatten(0, 1)
    state = [(id(weight), weight._version, weight.data_ptr()) for weight in weights]
    cached = adapter.__dict__.get("_stacked_W_O")
    if cached is None or cached[0] != state:
        # (the weights are held with the state: an id is only unique while its object lives)
        cached = adapter._stacked_W_O = (state, weights, adapter.W_O_all().float().flatten(0, 1).contiguous())
    return cached[2]


@without_grad
def layer_and_head_increase(capture: TargetCapture) -> tuple[list[LayerIncrease], list[HeadIncrease]]:
    """Layer-level and head-level increases for every row, from one batched scoring call.

    Scores ``[x_l, x_l + a_l, x_l + a_l + m_l (each L), x_l + h_lj (L*H), final]`` for all rows at once.
    """
    batch, n_layers, n_heads, _ = capture.z.shape
    d = capture.resid_pre.shape[-1]
    # every vector in one float32 buffer, built in place and normalised in place: at a 7B model's size a
    # copy of it is ~18 MB, a quarter of a forward's peak activations
    vectors = capture.resid_pre.new_empty((batch, 3 * n_layers + n_layers * n_heads + 1, d), dtype=torch.float32)
    x, after_attn, after_mlp = (vectors.narrow(1, i * n_layers, n_layers) for i in range(3))
    x.copy_(capture.resid_pre)
    torch.add(x, float32(capture.attn_out), out=after_attn)
    torch.add(after_attn, float32(capture.mlp_out), out=after_mlp)
    with_head = vectors.narrow(1, 3 * n_layers, n_layers * n_heads).view(batch, n_layers, n_heads, d)
    with_head.copy_(x.unsqueeze(2))  # (copy_ broadcasts over the heads)
    head_vectors(capture, out=with_head)                                        # x_l + h_lj
    vectors.select(1, -1).copy_(capture.final)
    lp = capture.scorer.log_prob(vectors, overwrite=True)  # [B, 3L + L*H + 1]
    return _layer_and_head_results(lp, capture.model_logprob, [capture.meta(row) for row in range(batch)],
                                   n_layers, n_heads)


#: ``(n_layers, n_heads, device) -> index``: for each increase after ``lp``'s base block, the score it is
#: taken against
_REFERENCE_INDEX: dict[tuple, torch.Tensor] = {}


def _reference_index(n_layers: int, n_heads: int, device: torch.device) -> torch.Tensor:
    """``[2L + L*H]``: ``x_l`` for ``x_l + a_l``, ``x_l + a_l`` for ``x_l + a_l + m_l``, ``x_l`` for each
    ``x_l + h_lj``, as indices into ``[x (L), x + a (L), x + a + m (L), ...]``."""
    key = (n_layers, n_heads, device)
    index = _REFERENCE_INDEX.get(key)
    if index is None:
        layers = torch.arange(n_layers)
        index = torch.cat([layers, layers + n_layers, layers.repeat_interleave(n_heads)]).to(device)
        _REFERENCE_INDEX[key] = index
    return index


def _layer_and_head_results(lp: torch.Tensor, model_logprob: torch.Tensor, metas: list[dict], n_layers: int,
                            n_heads: int) -> tuple[list[LayerIncrease], list[HeadIncrease]]:
    """Results from the scores ``lp`` ``[B, 3L + L*H + 1]`` of ``[x_l, x_l + a_l, x_l + a_l + m_l, x_l + h_lj,
    final]`` (wherever they were computed)."""
    layer_results, head_results = [], []
    # every increase in one subtraction: [B, 2L + L*H] = (x + a, x + a + m, x + h) - (x, x + a, x);
    # results hold ordinary tensors also when the scores were made in inference mode (differences and
    # copies made outside it are ordinary; views of its tensors would not be)
    with torch.inference_mode(False):
        increases = lp.narrow(1, n_layers, (2 + n_heads) * n_layers) - \
            lp.index_select(1, _reference_index(n_layers, n_heads, lp.device))
        increases = _on_cpu(increases)
        base = _on_cpu(lp.narrow(1, 0, n_layers)).clone()
    final, model_logprob = lp.select(1, -1).tolist(), model_logprob.tolist()
    for row, meta in enumerate(metas):
        row_increases = increases.select(0, row)
        layer_results.append(LayerIncrease(attention=row_increases.narrow(0, 0, n_layers),
                                           mlp=row_increases.narrow(0, n_layers, n_layers), base=base.select(0, row),
                                           final_logprob=final[row], model_logprob=model_logprob[row], **meta))
        head_results.append(HeadIncrease(scores=row_increases.narrow(0, 2 * n_layers, n_layers * n_heads)
                                         .view(n_layers, n_heads), **meta))
    return layer_results, head_results


def check_heads(adapter, heads) -> list[tuple[int, int]]:
    """``heads`` as a non-empty list of in-range ``(layer, head)`` pairs, or one clear error."""
    if heads is None or len(heads) == 0:
        raise ValueError("the head set is empty; pass heads='top', a number k of top heads, or [(layer, head), ...]")
    checked = []
    for pair in heads:
        if len(pair) != 2:
            raise ValueError(f"each head must be a (layer, head) pair, got {pair!r}")
        checked.append((adapter.check_layer(int(pair[0])), adapter.check_head(int(pair[1]))))
    return checked


@without_grad
def position_scores(capture: TargetCapture, layer: int, head: int, rows=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(increase [b, S], attention [b, S])`` of head ``(layer, head)`` at every source position.

    ``rows`` selects batch rows (default all); positions are batch coordinates (padding gives 0).
    """
    adapter = capture.adapter
    if layer not in capture.kv_layers:
        raise ValueError(f"layer {layer}'s keys and values were not captured; capture with "
                         f"capture_target(..., kv_layers='all') or a list that includes {layer}")
    keys = capture.cache["k", layer]
    n_rows = len(capture.items)
    rows = list(range(n_rows)) if rows is None else [int(r) for r in rows]
    every_row = rows == list(range(n_rows))

    def of_rows(x: torch.Tensor) -> torch.Tensor:  # every row: the tensor itself (a list index is a gather)
        return x if every_row else x[rows]

    scorer = capture.scorer if every_row else capture.scorer.select(rows)
    dims = adapter._text_dims()
    group = dims["n_heads"] // dims["n_kv_heads"]
    blocks = None if capture.attention_blocks is None else of_rows(capture.attention_blocks)
    # the queries as recorded, [B, 1, H, hd] at t
    pattern = attention_rows(adapter, layer, of_rows(capture.cache["q", layer]), of_rows(keys),
                             of_rows(capture.positions).view(-1, 1),
                             of_rows(capture.attention_mask) if capture.padded else None, heads=[head], blocks=blocks)
    attention = pattern.view(pattern.shape[0], -1)  # [b, S]: A_lj[t, :] (of [b, 1, 1, S])
    values = float32(of_rows(capture.cache["v", layer]).select(2, head // group))  # [b, S, hd]
    coefficients, basis = attention.unsqueeze(-1) * values, adapter.W_O_head(layer, head)
    frozen = capture.frozen_output_norm(layer, "attn")
    if frozen is not None:  # post-norm: the frozen scale per row into the coefficients, the gain into the basis
        coefficients = coefficients * of_rows(frozen[0]).view(-1, 1, 1)
        basis = basis.float() * frozen[1]
    lp, lp_base = scorer.log_prob_in_basis(of_rows(capture.resid_pre).select(1, layer), coefficients, basis)
    return lp - lp_base.unsqueeze(1), attention


@without_grad
def position_increase(capture: TargetCapture, heads, *, progress: bool = False) -> list[HeadPositions]:
    """Position-level increases of ``heads`` for each row, in the row's own coordinates.

    ``heads``: a list of ``(layer, head)`` shared by all rows, or (one list per row) a list of such lists.
    Each distinct head costs about ``(head_dim * d + S * head_dim) * vocab`` multiply-adds.
    """
    adapter = capture.adapter
    n_rows = len(capture.items)
    per_row = heads if heads and isinstance(heads[0], (list, tuple)) and heads[0] and \
        isinstance(heads[0][0], (list, tuple)) else [heads] * n_rows
    if len(per_row) != n_rows:
        raise ValueError(f"{len(per_row)} head sets for {n_rows} rows")
    per_row = [check_heads(adapter, h) for h in per_row]
    # Compute each distinct head once, for the rows that asked for it.
    wanted: dict[tuple[int, int], list[int]] = {}
    for row, row_heads in enumerate(per_row):
        for pair in row_heads:
            wanted.setdefault(pair, []).append(row)
    computed = {}
    pending = tqdm(wanted.items(), desc="heads", leave=False) if progress else wanted.items()
    for (layer, head), rows_for_head in pending:
        increase, attention = position_scores(capture, layer, head, rows_for_head)
        for i, row in enumerate(rows_for_head):
            computed[layer, head, row] = (increase[i], attention[i])
    results, offsets = [], capture.offsets.tolist()
    with torch.inference_mode(False):  # stacked copies: ordinary tensors whatever mode scored them
        for row, row_heads in enumerate(per_row):
            offset = offsets[row]
            scores = torch.stack([_from(computed[l, j, row][0], offset) for l, j in row_heads])
            attention = torch.stack([_from(computed[l, j, row][1], offset) for l, j in row_heads])
            results.append(_head_positions(capture.items[row], row_heads, _on_cpu(scores), _on_cpu(attention),
                                           capture.meta(row)))
    return results


def _from(x: torch.Tensor, offset: int) -> torch.Tensor:
    """``x[offset:]`` (a row's own coordinates), without the slicing call where there is no padding."""
    return x if offset == 0 else x[offset:]


def _on_cpu(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_cpu else x.cpu()  # (a move to where it is still costs a dispatch)


def _head_positions(item: PreparedInput, row_heads, scores: torch.Tensor, attention: torch.Tensor,
                    meta: dict) -> HeadPositions:
    """One row's result from its increases and attention ``[n_heads, S]`` (the row's own coordinates)."""
    geometry = item.geometry
    image_scores = geometry.to_grid(scores.index_select(1, geometry.positions), copy=False)  # (a fresh tensor)
    return HeadPositions(
        scores=scores, image_scores=image_scores, attention=attention, heads=[list(h) for h in row_heads],
        str_tokens=list(item.str_tokens), image_positions=geometry.positions.tolist(),
        image_size=list(geometry.image_size), image=torch.from_numpy(item.display_image()),
        image_boxes=geometry.boxes.clone(), image_view=geometry.view.clone(), **meta)


def _check_heads_argument(adapter, heads) -> None:
    """Validate ``explain``'s ``heads`` before any forward runs."""
    if isinstance(heads, str):
        if heads != "top":
            raise ValueError(f"heads must be 'top', an int k, or [(layer, head), ...]; got {heads!r}")
    elif isinstance(heads, int) and not isinstance(heads, bool):
        if heads < 1:
            raise ValueError(f"the head set is empty (k={heads}); ask for at least one top head")
        if heads > adapter.n_layers * adapter.n_heads:
            raise ValueError(f"k={heads} top heads asked but the model has {adapter.n_layers * adapter.n_heads}")
    elif isinstance(heads, (list, tuple)):
        check_heads(adapter, heads)
    else:
        raise TypeError(f"heads must be 'top', an int k, or [(layer, head), ...]; got {type(heads).__name__}")


def _head_sets(heads, head_results: list[HeadIncrease]) -> list[list[tuple[int, int]]]:
    """Resolve ``heads`` ("top", an int k, or explicit pairs) into one head set per row."""
    if isinstance(heads, (str, int)):
        k = 1 if isinstance(heads, str) else heads
        return [_top_heads(result.scores, k) for result in head_results]
    return [list(heads)] * len(head_results)


def _top_heads(scores: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """``HeadIncrease.top_heads(k)`` (the same top-k) with the index arithmetic in Python: cheaper
    than unravelling in tensors for the few heads asked."""
    n_heads = scores.shape[1]
    _, index = float32(scores.flatten()).topk(min(k, scores.numel()))
    return [divmod(i, n_heads) for i in index.tolist()]


def explain(vqa, inp: PreparedInput | BatchedInput, target=None, *, heads="top", k: int = 10,
            neurons: bool | list[int] = False, box=None, view: int = 0,
            chunk_elements: int = CHUNK_ELEMENTS, progress: bool = True) -> Explanation | list[Explanation]:
    """Explain one answer token: layer, head and position-level increases, the image map, neurons.

    Args:
        vqa: a :class:`~mech_vqa.model.VQAModel`.
        inp: a prepared input, or a batch (then ``target`` is a list, one per row, and a list of
            explanations comes back, each equal to the single-row run).
        target: the token to explain (default ``inp.target()``: the first answer token).
        heads: heads whose position-level map is computed and summed into the patch map: ``"top"``
            (the single head with the largest increase, the paper's choice), an int ``n`` (the top
            ``n``), or explicit ``[(layer, head), ...]``.
        k: number of top neurons per layer kept (with the tokens they promote) when ``neurons``.
        neurons: False, True (all layers) or a list of layers for the FFN-neuron attribution.
        box: optional ground-truth box ``[x0, y0, x1, y1]`` (preprocessed-image pixels) stored with
            the patch map; for a batch, one box per row or one for all.
        view: which image view the patch map shows: 0 = the first view's patch grid; 1 = LLaVA-NeXT's
            high-resolution tiles, painted over the same image (``positions.patch_map(view=...)``).
        chunk_elements: size of one block of logits during scoring (float32 elements).
        progress: show progress bars (over heads for the position level, layers for neurons).
    """
    _check_heads_argument(vqa.adapter, heads)  # fail before the forward
    items = inp.items if isinstance(inp, BatchedInput) else [inp]
    boxes = box if box is not None and len(box) and isinstance(box[0], (list, tuple)) else [box] * len(items)
    for item, item_box in zip(items, boxes):
        if item_box is not None:
            check_box(item_box, item.geometry.image_size)
    kv_layers = sorted({int(layer) for layer, _ in heads}) if isinstance(heads, (list, tuple)) else "all"
    if neurons is False and _near_model(vqa):
        # the backend scores where the activations are (inside an nnsight trace, remotely on NDIF)
        layer_results, head_results, positions = _scores_near_model(vqa, inp, target, heads, chunk_elements)
        out = [Explanation(layers=lr, heads=hr, positions=pr, patch_map=pr.patch_map(box=bx, view=view), neurons=None)
               for lr, hr, pr, bx in zip(layer_results, head_results, positions, boxes)]
        return out if isinstance(inp, BatchedInput) else out[0]
    # nothing here needs autograd: the backend's cheapest read-only mode for the forward and the
    # scoring alike (the results are assembled from ordinary tensors); the decoder layers looked up once
    with vqa.backend.read_only(), vqa.adapter.resolving():
        capture = capture_target(vqa, inp, target, kv_layers=kv_layers, mlp_act=neurons is not False,
                                 chunk_elements=chunk_elements)
        layer_results, head_results = layer_and_head_increase(capture)
        positions = position_increase(capture, _head_sets(heads, head_results), progress=progress)
        neuron_results = [None] * len(positions)
        if neurons is not False:
            from .neurons import neuron_increase_from_capture

            layers = None if neurons is True else neurons
            neuron_results = neuron_increase_from_capture(capture, layers=layers, k=k, progress=progress)
    out = [Explanation(layers=lr, heads=hr, positions=pr, patch_map=pr.patch_map(box=bx, view=view), neurons=nr)
           for lr, hr, pr, nr, bx in zip(layer_results, head_results, positions, neuron_results, boxes)]
    return out if isinstance(inp, BatchedInput) else out[0]


def _scores_near_model(vqa, inp, target, heads, chunk_elements: int = CHUNK_ELEMENTS):
    """:func:`explain`'s layer, head and position levels scored by the backend next to the model
    (``vqa.backend.explain_scores``): only scores come back, no activations. ``heads``: as
    :func:`explain`'s, or ``[]`` for no position level."""
    adapter = vqa.adapter
    items, targets, offsets = _targets(vqa, inp, target)
    positions = torch.tensor([t.position for t in targets]) + offsets
    if isinstance(heads, (str, int)):
        request = ("top", 1 if isinstance(heads, str) else heads)
        kv_layers = list(range(adapter.n_layers))
    else:
        pairs = check_heads(adapter, heads) if len(heads) else []
        request, kv_layers = ("pairs", pairs), sorted({layer for layer, _ in pairs})
    scores = vqa.backend.explain_scores(
        adapter.model_inputs(inp.model_inputs(vqa.device, adapter.vision_dtype())), positions=positions,
        token_ids=torch.tensor([t.token_id for t in targets]), heads=request, kv_layers=kv_layers,
        chunk_elements=chunk_elements)
    metas = [_meta(vqa, item, t) for item, t in zip(items, targets)]
    layer_results, head_results = _layer_and_head_results(scores["lp"], scores["model_logprob"], metas,
                                                          adapter.n_layers, adapter.n_heads)
    positions_results = []
    if request[0] == "top" or request[1]:
        for row, (item, meta) in enumerate(zip(items, metas)):
            offset = int(offsets[row])
            row_heads = [(int(layer), int(head)) for layer, head in scores["heads"][row].tolist()]
            positions_results.append(_head_positions(item, row_heads, scores["increase"][row, :, offset:],
                                                     scores["attention"][row, :, offset:], meta))
    return layer_results, head_results, positions_results


def _near_model(vqa) -> bool:
    return getattr(getattr(vqa, "backend", None), "scores_near_model", False)


def head_increase(vqa, inp: PreparedInput, target: Target | None = None) -> HeadIncrease:
    """Head-level increases ``[n_layers, n_heads]`` for one input (one forward)."""
    _check_single(inp)
    if _near_model(vqa):
        return _scores_near_model(vqa, inp, target, [])[1][0]
    return layer_and_head_increase(capture_target(vqa, inp, target, kv_layers=None))[1][0]


def layer_increase(vqa, inp: PreparedInput, target: Target | None = None) -> LayerIncrease:
    """Attention and MLP block increases per layer for one input (one forward)."""
    _check_single(inp)
    if _near_model(vqa):
        return _scores_near_model(vqa, inp, target, [])[0][0]
    return layer_and_head_increase(capture_target(vqa, inp, target, kv_layers=None))[0][0]


def head_positions(vqa, inp: PreparedInput, heads, target: Target | None = None) -> HeadPositions:
    """Position-level increases of ``heads`` ``[(layer, head), ...]`` for one input (one forward)."""
    _check_single(inp)
    heads = check_heads(vqa.adapter, heads)
    if _near_model(vqa):
        return _scores_near_model(vqa, inp, target, heads)[2][0]
    return position_increase(capture_target(vqa, inp, target, kv_layers=[layer for layer, _ in heads]), heads)[0]


def _check_single(inp) -> None:
    if not isinstance(inp, PreparedInput):
        raise TypeError(f"this function takes one PreparedInput; for a batch use explain(vqa, batch, targets) "
                        f"(got {type(inp).__name__})")
