"""Tensor parallelism (transformers' ``tp_plan``): where a rank's activations and weights are slices,
and how the capture layer puts them back together.

transformers 5.24 shards a model by its plan (``model._tp_plan``, module name patterns -> style
names such as ``colwise`` / ``rowwise``): each planned module's parameters become DTensors
(``Shard(0)`` for colwise, ``Shard(1)`` for rowwise weights) and its ``forward`` is replaced on the
instance by one that moves activations between layouts. Hooks see the module's input before and its
output after that replacement, so on a LLaVA-Llama plan (q/k/v and gate/up colwise, o_proj and
down_proj rowwise) a rank's ``q`` / ``k`` / ``v`` (projection outputs), ``z`` (o_proj input),
``pattern`` (heads of the attention it runs) and ``mlp_act`` (down_proj input) hold its slice of
the heads / neurons, while block outputs and the residual stream are whole on every rank.

:class:`TensorParallelLayout` reads the split of a module's input or output from the style object
transformers applied (its ``input_layouts`` / ``output_layouts``), never from module names, and
gathers a slice across the TP group (``torch.distributed``; gloo on CPU) so methods see whole
tensors, identical on every rank. Every rank must make the same calls in the same order (they run
the same method on the same inputs), as for any collective.
"""

from __future__ import annotations

import re
import weakref

import torch
import torch.nn.functional as F
from torch import nn


class TensorParallelError(RuntimeError):
    """A tensor-parallel layout the capture layer cannot read (the message names the style and module)."""


def tp_size(model: nn.Module) -> int:
    """The tensor-parallel degree transformers recorded on ``model`` (1 when not tensor-parallel)."""
    size = getattr(model, "_tp_size", None)
    if size is None and not hasattr(type(model), "_tp_size"):  # (transformers' tp_size property reads _tp_size)
        size = getattr(model, "tp_size", None)
    return int(size) if size is not None else 1


def is_tensor_parallel(model: nn.Module) -> bool:
    return tp_size(model) > 1


_DTENSOR: list = []  # the DTensor class once imported (an import statement per call costs more than the check)


def is_dtensor(value) -> bool:
    """Whether ``value`` is a ``torch.distributed.tensor.DTensor`` (without importing it when unused)."""
    if not _DTENSOR:
        if not torch.distributed.is_available():
            return False
        from torch.distributed.tensor import DTensor

        _DTENSOR.append(DTensor)
    return isinstance(value, _DTENSOR[0])


def _generic_name(name: str) -> str:
    """``layers.3.self_attn`` -> ``layers.*.self_attn``: how transformers' plans name repeated modules."""
    return re.sub(r"\.\d+(\.|$)", lambda m: ".*" + m.group(1), name)


def _whole_output_styles() -> tuple[type, ...]:
    """Style classes without ``output_layouts`` whose output is whole on every rank: the plain base (a
    replicated parameter), embeddings (partial lookups summed / slices gathered) and all-reduce."""
    from transformers.distributed import tensor_parallel as tp

    return (tp.TensorParallelLayer, tp.EmbeddingParallel, tp.AllReduceParallel)


def _weight_input_placement(module: nn.Module):
    """How ``module``'s weight splits its input features (its last dim), None when whole or not sharded:
    ``Shard(-1)`` for a plain split, the placement itself (raised on by the caller) for any other."""
    from torch.distributed.tensor import Replicate, Shard

    weight = getattr(module, "weight", None)
    if not is_dtensor(weight) or weight.ndim < 2:
        return None
    placement = weight.placements[0]
    if isinstance(placement, Replicate):
        return None
    if type(placement) is Shard:
        return Shard(-1) if placement.dim % weight.ndim == weight.ndim - 1 else None
    return placement  # strided (packed) shards: not gathered here


def _placement_dim(placements) -> int | None:
    """The dim a layout splits (``Shard(d)``), None for a whole one (``Replicate``); a layout that is
    neither (partial sums, strided shards of packed weights) raises."""
    from torch.distributed.tensor import Replicate, Shard

    placements = placements if isinstance(placements, (tuple, list)) else (placements,)
    if len(placements) != 1:
        raise TensorParallelError(f"a {len(placements)}-dim layout {placements}")
    placement = placements[0]
    if type(placement) is Shard:
        return placement.dim
    if isinstance(placement, Replicate):
        return None
    raise TensorParallelError(f"layout {placement}")


class TensorParallelLayout:
    """How one tensor-parallel model splits the inputs and outputs of its planned modules.

    Built from the model's plan and the style objects transformers registered under the plan's style
    names (``ALL_PARALLEL_STYLES``); the TP process group, this rank and the group size come from the
    device mesh of the model's sharded parameters.
    """

    def __init__(self, model: nn.Module):
        from torch.distributed.tensor import DTensor
        from transformers.distributed.tensor_parallel import ALL_PARALLEL_STYLES

        self.plan = dict(getattr(model, "_tp_plan", None) or {})
        self._styles = ALL_PARALLEL_STYLES
        self._names = {id(module): name for name, module in model.named_modules()}
        mesh = next((p.device_mesh for p in model.parameters() if isinstance(p, DTensor)), None)
        if mesh is None:
            raise TensorParallelError(
                f"the model says it is tensor-parallel (tp_size={tp_size(model)}) but holds no sharded (DTensor) "
                "parameter; load it with from_pretrained(..., tp_plan='auto') under torchrun")
        if mesh.ndim != 1:
            mesh = mesh["tp"]
        self.group = mesh.get_group()
        self.rank = mesh.get_local_rank()
        self.size = mesh.size()

    # --------------------------------------------------------------------------- reading the plan
    def style_name(self, module: nn.Module) -> str | None:
        """The plan's style for ``module`` (None: not planned, its parameters and outputs are whole)."""
        name = self._names.get(id(module))
        return None if name is None else self.plan.get(_generic_name(name))

    def split(self, module: nn.Module, side: str) -> tuple[int, int] | None:
        """``(dim, whole size)`` along which ``module``'s ``side`` ("input" as its pre-hooks see it, "output"
        as its hooks see it) holds this rank's slice, or None when it is whole on every rank."""
        style_name = self.style_name(module)
        if style_name is None:
            return None
        style = self._styles[style_name]
        layouts = getattr(style, f"{side}_layouts", None)
        if layouts is None and side == "input":
            # a style that takes its input as it comes: split where its weight's input features are
            layouts = _weight_input_placement(module)
            if layouts is None:
                return None
        if layouts is None:
            if type(style) in _whole_output_styles():
                return None
            raise TensorParallelError(
                f"{type(module).__name__} {self._names.get(id(module))!r} is sharded with style {style_name!r}, whose "
                f"{side} layout the capture layer cannot read; capture elsewhere or load without tp_plan")
        if isinstance(layouts, (tuple, list)) and len(layouts) == 1 and side == "input":
            layouts = layouts[0]
        try:
            dim = _placement_dim(layouts)
        except TensorParallelError as err:
            raise TensorParallelError(
                f"{type(module).__name__} {self._names.get(id(module))!r} (style {style_name!r}) hands its {side} over "
                f"as {err}, which the capture layer cannot gather; capture elsewhere or load without tp_plan") from None
        if dim is None:
            return None
        whole = getattr(module, "in_features" if side == "input" else "out_features", None)
        if whole is None:
            raise TensorParallelError(f"{type(module).__name__} {self._names.get(id(module))!r} (style {style_name!r}) "
                                      f"splits its {side} but names no {'in' if side == 'input' else 'out'}_features")
        return dim, int(whole)

    # ---------------------------------------------------------------------------- slices and heads
    def local_range(self, whole: int, rank: int | None = None) -> range:
        """The units of a dim of ``whole`` that ``rank`` (default this one) holds: DTensor's ``Shard``
        chunks, ``ceil(whole / size)`` each, the last ranks' shorter or empty."""
        rank = self.rank if rank is None else rank
        chunk = -(-whole // self.size)
        return range(min(rank * chunk, whole), min((rank + 1) * chunk, whole))

    def local_heads(self, module: nn.Module, side: str, head_dim: int) -> range | None:
        """The heads this rank holds of ``module``'s ``side`` (features ``heads * head_dim``), None when whole."""
        split = self.split(module, side)
        if split is None:
            return None
        features = self.local_range(split[1])
        if features.start % head_dim or features.stop % head_dim:
            raise TensorParallelError(
                f"{type(module).__name__} {self._names.get(id(module))!r}: this rank holds features {features.start}.."
                f"{features.stop - 1}, which split a head of {head_dim}; use a tp_size that divides the heads")
        return range(features.start // head_dim, features.stop // head_dim)

    # -------------------------------------------------------------------------------------- gather
    def gather(self, x: torch.Tensor, dim: int, whole: int) -> torch.Tensor:
        """This rank's slice ``x`` of a tensor split along ``dim`` -> the whole tensor (every rank the same).

        Differentiable when ``x`` requires grad (the gradient of each slice goes back to its rank)."""
        dim = dim % x.dim()
        here = len(self.local_range(whole))
        if x.shape[dim] != here:
            raise TensorParallelError(f"a slice of {x.shape[dim]} along dim {dim}, where rank {self.rank} of "
                                      f"{self.size} holds {here} of {whole}")
        chunk = -(-whole // self.size)
        if here < chunk:  # equal sizes for the collective; the padding is cut off below
            pad = list(x.shape)
            pad[dim] = chunk - here
            x = torch.cat([x, x.new_zeros(pad)], dim)
        x = x.contiguous()
        if x.requires_grad:
            from torch.distributed.nn.functional import all_gather

            parts = all_gather(x, group=self.group)
        else:
            parts = [torch.empty_like(x) for _ in range(self.size)]
            torch.distributed.all_gather(parts, x, group=self.group)
        return torch.cat(list(parts), dim).narrow(dim, 0, whole)


_LAYOUTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def layout_of(model: nn.Module) -> TensorParallelLayout | None:
    """``model``'s :class:`TensorParallelLayout` (built once per model and plan), None when not tensor-parallel."""
    if not is_tensor_parallel(model):
        return None
    plan = getattr(model, "_tp_plan", None)
    cached = _LAYOUTS.get(model)
    if cached is None or cached[0] is not plan:
        cached = _LAYOUTS[model] = (plan, TensorParallelLayout(model))
    return cached[1]


def gather_heads(layout: TensorParallelLayout | None, q_proj: nn.Module, x: torch.Tensor, n_heads: int,
                 head_dim: int, dim: int = 1) -> torch.Tensor:
    """A per-head tensor of one attention layer (its weights, their gradients), ``x`` with this rank's heads
    along ``dim``, made whole: a rank's attention runs on the heads of its slice of the query projection's
    output. Unchanged on a model that is not tensor-parallel or whose heads are whole."""
    if layout is None:
        return x
    heads = layout.local_heads(q_proj, "output", head_dim)
    if heads is None:
        return x
    if heads != layout.local_range(n_heads):
        raise TensorParallelError(f"this rank holds heads {heads.start}..{heads.stop - 1} of {n_heads}, not an even "
                                  "share; use a tp_size that divides the heads")
    return layout.gather(x, dim, n_heads)


def whole_heads(adapter, layer: int, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """:func:`gather_heads` for layer ``layer`` of the adapter's model (for methods that record attention
    weights with hooks of their own)."""
    return gather_heads(layout_of(adapter.model), adapter.q_proj(layer), x, adapter.n_heads, adapter.head_dim, dim)


def local_head_mask(adapter, layer: int, mask):
    """An attention mask ``[B, heads | 1, Q, K]`` for layer ``layer`` cut to the heads this rank's attention
    runs (per-head masks: the attention knockout's); unchanged on a model that is not tensor-parallel, for
    a mask shared by every head, or None."""
    if mask is None or mask.dim() != 4 or mask.shape[1] == 1 or mask.shape[1] != adapter.n_heads:
        return mask
    layout = layout_of(adapter.model)
    heads = None if layout is None else layout.local_heads(adapter.q_proj(layer), "output", adapter.head_dim)
    return mask if heads is None else mask[:, heads.start:heads.stop]


def full_parameter(value: torch.Tensor) -> torch.Tensor:
    """A parameter as the whole tensor: a sharded one (DTensor) gathered across its mesh (a collective:
    every rank reads it), any other as it is."""
    return value.full_tensor() if is_dtensor(value) else value


def call_on_whole(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for a whole input ``x`` outside the forward: a linear layer that tensor parallelism
    sharded (its forward then takes and gives one rank's slices) is applied with its whole weight."""
    weight = getattr(module, "weight", None)
    if isinstance(module, nn.Linear) and is_dtensor(weight):
        bias = module.bias
        return F.linear(x.to(weight.dtype), full_parameter(weight), None if bias is None else full_parameter(bias))
    return module(x.to(weight.dtype) if weight is not None else x)
