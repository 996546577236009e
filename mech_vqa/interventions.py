"""Interventions: edit activations during the forward pass through the same hooks as capture.

An :class:`Intervention` names a site, a layer, optionally heads / positions / batch rows, and what
to write there (``zero``, ``mean`` or ``replace`` with a given value). Several can run at once; a
batched sweep gives each intervention its own batch row (``rows``), so one forward evaluates many.

Sites and the shape of the slice they edit (``P`` = chosen positions, all by default):

==============  ==============================  ====================================
site            hook                            edited slice, value broadcast to it
==============  ==============================  ====================================
``z``           pre-hook of ``o_proj``          ``[P, len(heads), head_dim]``
``attn_out``    hook of ``self_attn`` (*)       ``[P, d_model]``
``mlp_out``     hook of ``mlp`` (*)             ``[P, d_model]``
``resid_pre``   pre-hook of the decoder layer   ``[P, d_model]`` (image positions included)
``resid_post``  hook of the decoder layer       ``[P, d_model]``
==============  ==============================  ====================================

(*) of the block's post-norm where one normalises the output before the residual add (Gemma-3).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .adapters import ModelAdapter
from .hooks import HookSet
from .tensor_parallel import layout_of, local_head_mask

SITES = ("z", "attn_out", "mlp_out", "resid_pre", "resid_post")
MODES = ("zero", "mean", "replace")


def _tuple(x) -> tuple[int, ...] | None:
    if x is None:
        return None
    if isinstance(x, int):
        return (x,)
    if torch.is_tensor(x):
        return tuple(int(v) for v in x.flatten().tolist())
    return tuple(int(v) for v in x)


@dataclass(frozen=True, eq=False)
class Intervention:
    """Write ``zero`` / ``mean`` / ``replace`` into ``site`` of ``layer``.

    Args:
        site: one of :data:`SITES`.
        layer: decoder layer index.
        heads: heads to edit (site ``z`` only); None = all heads.
        positions: sequence positions to edit; None = all.
        mode: ``zero``, ``mean`` (``value`` is the mean activation of a reference set) or
            ``replace`` (``value`` is the activation to write, e.g. from another input).
        value: tensor broadcastable to the edited slice (see the module table).
        rows: batch rows the edit applies to; None = every row.
    """

    site: str
    layer: int
    heads: Sequence[int] | int | None = None
    positions: Sequence[int] | torch.Tensor | int | None = None
    mode: str = "zero"
    value: torch.Tensor | None = None
    rows: Sequence[int] | int | None = None

    def __post_init__(self):
        if self.site not in SITES:
            raise ValueError(f"unknown intervention site {self.site!r}; choose one of {SITES}")
        if self.mode not in MODES:
            raise ValueError(f"unknown intervention mode {self.mode!r}; choose one of {MODES}")
        if self.mode != "zero" and self.value is None:
            raise ValueError(f"mode {self.mode!r} needs a value tensor")
        if self.heads is not None and self.site != "z":
            raise ValueError("heads= applies to site 'z' only (per-head outputs before o_proj)")
        for name in ("heads", "positions", "rows"):
            object.__setattr__(self, name, _tuple(getattr(self, name)))


def zero_head(layer: int, head: int, **kw) -> Intervention:
    return Intervention("z", layer, heads=head, **kw)


def zero_block(layer: int, block: str = "attn", **kw) -> Intervention:
    """Zero a whole attention (``block='attn'``) or MLP (``block='mlp'``) output."""
    if block not in ("attn", "mlp"):
        raise ValueError(f"block must be 'attn' or 'mlp', got {block!r}")
    return Intervention(f"{block}_out", layer, **kw)


def _local_edits(edits: list[Intervention], heads_here: range, n_heads: int) -> list[Intervention]:
    """``edits`` of site ``z`` as they apply to the heads ``heads_here`` one tensor-parallel rank holds:
    head numbers made local, values cut to those heads, edits of heads held elsewhere dropped."""
    local = []
    for edit in edits:
        named = list(edit.heads) if edit.heads is not None else list(range(n_heads))
        for h in named:
            if not 0 <= h < n_heads:
                raise IndexError(f"head {h} is out of range: the model has {n_heads} heads (0..{n_heads - 1})")
        keep = [i for i, h in enumerate(named) if h in heads_here]
        if not keep:
            continue
        value = edit.value
        # a value broadcasts to [..., len(heads), head_dim]: a heads dim, where it has one, is its dim -2
        if value is not None and value.dim() >= 2 and value.shape[-2] == len(named) and len(named) > 1:
            value = value.index_select(-2, torch.tensor(keep, device=value.device))
        local.append(Intervention("z", edit.layer, heads=[named[i] - heads_here.start for i in keep],
                                  positions=edit.positions, mode=edit.mode, value=value, rows=edit.rows))
    return local


def _apply(x: torch.Tensor, edits: list[Intervention], adapter: ModelAdapter, per_head: bool,
           heads_here: range | None = None) -> torch.Tensor:
    """Return ``x`` ``[B, S, D]`` with ``edits`` applied (a copy; the input is not modified).

    ``heads_here``: the heads a tensor-parallel rank's ``x`` holds (site ``z``), None for all."""
    n_heads = adapter.n_heads
    if per_head and heads_here is not None:
        edits, n_heads = _local_edits(edits, heads_here, n_heads), len(heads_here)
        if not edits:
            return x
    x = x.clone()
    batch, seq = x.shape[:2]
    view = x.view(batch, seq, n_heads, adapter.head_dim) if per_head else x
    for edit in edits:
        rows = list(edit.rows) if edit.rows is not None else slice(None)
        if edit.rows is not None and max(edit.rows) >= batch:
            raise IndexError(f"intervention row {max(edit.rows)} is outside the batch of {batch}")
        positions = list(edit.positions) if edit.positions is not None else slice(None)
        if edit.positions is not None and not all(-seq <= p < seq for p in edit.positions):
            raise IndexError(f"intervention positions {edit.positions} fall outside the sequence of length {seq}")
        target = view[rows]  # advanced indexing copies: edit the copy, then write it back
        if per_head:
            heads = list(edit.heads) if edit.heads is not None else slice(None)
            if heads_here is None:
                for h in edit.heads or ():
                    adapter.check_head(h)
            if isinstance(positions, list) and isinstance(heads, list):  # every named head at every named position
                positions, heads = torch.tensor(positions)[:, None], torch.tensor(heads)[None, :]
            idx = (positions, heads)
        else:
            idx = (positions,)
        current = target[(slice(None), *idx)]
        new = torch.zeros_like(current) if edit.mode == "zero" else edit.value.to(current).expand_as(current)
        target[(slice(None), *idx)] = new
        view[rows] = target
    return x


def register_interventions(hooks: HookSet, adapter: ModelAdapter, interventions: Sequence[Intervention]) -> None:
    """Register one hook per (site, layer) applying every intervention for it.

    On a tensor-parallel model (:mod:`mech_vqa.tensor_parallel`) whose ``o_proj`` input is split, each
    rank edits the heads it holds (head j on the rank whose slice of the features holds
    ``j * head_dim``: rank ``j // (n_heads / tp_size)``); other sites are whole on every rank."""
    layout = layout_of(adapter.model) if interventions else None
    groups: dict[tuple[str, int], list[Intervention]] = defaultdict(list)
    for edit in interventions:
        groups[(edit.site, adapter.check_layer(edit.layer))].append(edit)
    for (site, layer), edits in groups.items():
        if site == "z":
            o_proj = adapter.o_proj(layer)
            heads_here = None if layout is None else layout.local_heads(o_proj, "input", adapter.head_dim)

            def pre_z(module, args, kwargs, edits=edits, heads_here=heads_here):
                return (_apply(args[0], edits, adapter, True, heads_here), *args[1:]), kwargs
            hooks.pre(o_proj, pre_z)
        elif site == "resid_pre":
            def pre_resid(module, args, kwargs, edits=edits):
                if args:
                    return (_apply(args[0], edits, adapter, False), *args[1:]), kwargs
                kwargs = dict(kwargs, hidden_states=_apply(kwargs["hidden_states"], edits, adapter, False))
                return args, kwargs
            hooks.pre(adapter.layer(layer), pre_resid)
        else:
            module = {"attn_out": adapter.attn_out_module, "mlp_out": adapter.mlp_out_module,
                      "resid_post": adapter.layer}[site](layer)

            def post(module, args, kwargs, output, edits=edits):
                if isinstance(output, tuple):
                    return (_apply(output[0], edits, adapter, False), *output[1:])
                return _apply(output, edits, adapter, False)
            hooks.post(module, post)


@dataclass(frozen=True, eq=False)
class AttentionEdit:
    """Remove attention edges in decoder layer ``layer`` (the attention knockout's edit).

    ``blocked`` ``[batch, 1 | n_heads, R, K]`` bool: True removes the edge from query row ``first + r`` to
    key ``k`` (``1``: in every head), by the attention mask: its pre-softmax score becomes ``-inf``, its
    weight exactly zero, and the row's softmax renormalises over its remaining edges. Every backend applies
    it to the mask the layer's attention receives (:func:`~mech_vqa.backends.nnsight_ops.block_edges`);
    it needs eager or SDPA attention, which take explicit masks.
    """

    layer: int
    blocked: torch.Tensor
    first: int = 0

    def __post_init__(self):
        if not torch.is_tensor(self.blocked) or self.blocked.dtype != torch.bool or self.blocked.dim() != 4:
            raise ValueError("AttentionEdit.blocked must be a bool tensor [batch, 1 | n_heads, rows, keys]")
        if self.first < 0:
            raise ValueError(f"AttentionEdit.first must be >= 0, got {self.first}")

    def check(self, adapter: ModelAdapter) -> None:
        adapter.check_layer(self.layer)
        if self.blocked.shape[1] not in (1, adapter.n_heads):
            raise ValueError(f"AttentionEdit.blocked has {self.blocked.shape[1]} heads; give 1 (every head) or "
                             f"the model's {adapter.n_heads}")


def check_explicit_masks(model) -> None:
    """One clear error unless the text layers take explicit attention masks (eager or SDPA attention)."""
    config = getattr(model, "config", None)
    implementation = getattr(getattr(config, "text_config", config), "_attn_implementation", None)
    if implementation not in ("eager", "sdpa"):
        raise ValueError(f"attention edits need 'sdpa' or 'eager' attention (they edit the explicit mask), not "
                         f"{implementation!r}; load the model with attn_implementation='sdpa'")


def register_attention_edits(hooks: HookSet, adapter: ModelAdapter, edits: Sequence[AttentionEdit]) -> None:
    """One pre-hook per edited layer's attention, replacing the mask it receives (hooks backend)."""
    # torch-only: the same code runs inside nnsight traces
    from .backends.nnsight_ops import block_edges

    groups: dict[int, list] = defaultdict(list)
    for edit in edits:
        edit.check(adapter)
        groups[adapter.check_layer(edit.layer)].append((edit.first, edit.blocked))
    for layer, items in groups.items():
        def pre_attention(module, args, kwargs, layer=layer, items=items):
            hidden = args[0] if args else kwargs["hidden_states"]
            if "attention_mask" not in kwargs:
                raise RuntimeError(f"layer {layer}'s attention was called without an attention_mask keyword; this "
                                   "model family cannot take attention edits")
            mask = block_edges(kwargs["attention_mask"], items, layer, hidden.shape[0], hidden.shape[1])
            return args, {**kwargs, "attention_mask": local_head_mask(adapter, layer, mask)}
        hooks.pre(adapter.attn(layer), pre_attention)
