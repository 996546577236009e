"""The model adapter: the one place that knows module paths, dimensions and image-token geometry.

Methods never index ``model.language_model.layers`` or assume a 24 x 24 grid; they ask an adapter.
A new family subclasses :class:`ModelAdapter` (or a relative: LLaVA-NeXT's tiles subclass the LLaVA
adapter), overrides what differs (usually :meth:`image_geometry` and the vision modules) and
registers itself with :func:`register_adapter`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from ..tensor_parallel import full_parameter


@dataclass(frozen=True)
class ImageGeometry:
    """Where the image tokens of one sequence sit and which patch of the image each one shows.

    Attributes:
        positions: ``[n_image_tokens]`` sequence positions of the image tokens, in grid order.
        rowcol: ``[n_image_tokens, 2]`` (row, col) of each token on the patch grid.
        boxes: ``[n_image_tokens, 4]`` pixel box ``(x0, y0, x1, y1)`` of each token's patch in the
            preprocessed image the model saw (``image_size``).
        grid: ``(rows, cols)`` of the patch grid.
        image_size: ``(height, width)`` of the preprocessed image.
        view: per-token index of the view / tile the token belongs to (all 0 for LLaVA-1.5).
        view_boxes: ``[n_views, 4]`` the box ``(x0, y0, x1, y1)``, in the first view's pixels, that
            each view of ``pixel_values`` shows (a tile of a padded high-resolution canvas may
            reach beyond the image); None when ``pixel_values`` holds one view only.
        patch_layout: for models fed flattened patches (Qwen-VL), ``{"patch", "merge", "temporal",
            "channels"}`` of the processor's flattening (:func:`~mech_vqa.adapters.qwen_vl.patchify`);
            None when ``pixel_values`` are images.
        markers: sequence positions of the image's structural tokens (tile markers, image
            boundaries) that are not patches: never painted; None when the family has none known.

    With several views, every token's ``rowcol`` is on its own view's grid and its ``boxes`` are in
    the first view's pixels, so maps of any view can be drawn over the first view's image.
    """

    positions: torch.Tensor
    rowcol: torch.Tensor
    boxes: torch.Tensor
    grid: tuple[int, int]
    image_size: tuple[int, int]
    view: torch.Tensor
    view_boxes: torch.Tensor | None = None
    patch_layout: dict | None = None
    markers: torch.Tensor | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.positions.numel())

    def to_grid(self, values: torch.Tensor, *, copy: bool = True) -> torch.Tensor:
        """Lay ``[..., n_image_tokens]`` values (first view) on the patch grid: ``[..., rows, cols]``.

        ``copy=False``: the grid may be a view of ``values`` (for a tensor the caller just made)."""
        if values.shape[-1] != self.n_tokens:
            raise ValueError(
                f"to_grid expects {self.n_tokens} values (one per image token), got {values.shape[-1]}"
            )
        rows, cols = self.grid
        tokens, cells = self._grid_index()
        if cells is None:  # the first view's tokens fill the grid in raster order (LLaVA-1.5): a reshape
            grid = values.reshape(*values.shape[:-1], rows, cols)
            return grid.clone() if copy else grid
        out = values.new_zeros((*values.shape[:-1], rows * cols))
        out[..., cells] = values[..., tokens]
        return out.view(*values.shape[:-1], rows, cols)

    def _grid_index(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(first-view token indices, their flat grid cells)``, or ``(None, None)`` when those are
        every token in raster order; once per geometry (and version of its tensors): each
        explanation's maps are laid out with it."""
        key = (self.view._version, self.rowcol._version, self.grid)
        cached = self.__dict__.get("_grid_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        rows, cols = self.grid
        tokens = (self.view == 0).nonzero().flatten()
        cells = self.rowcol[tokens, 0] * cols + self.rowcol[tokens, 1]
        raster = tokens.numel() == self.view.numel() == rows * cols and bool(
            (cells == torch.arange(rows * cols)).all())
        index = (None, None) if raster else (tokens, cells)
        self.__dict__["_grid_cache"] = (key, index)
        return index

    def cell_boxes(self) -> torch.Tensor:
        """``[rows, cols, 4]`` pixel box of every grid cell (first view)."""
        rows, cols = self.grid
        out = torch.zeros(rows, cols, 4)
        first = self.view == 0
        rc = self.rowcol[first]
        out[rc[:, 0], rc[:, 1]] = self.boxes[first].float()
        return out

    def to_dict(self) -> dict:
        out = {"grid": list(self.grid), "image_size": list(self.image_size), "positions": self.positions.tolist()}
        if self.view_boxes is not None:
            out["view_boxes"] = self.view_boxes.tolist()
        return out

    def paint(self, values: torch.Tensor, view: int = 1, size: tuple[int, int] | None = None) -> torch.Tensor:
        """:func:`paint_boxes` of the tokens of ``view``: ``values`` ``[..., n_image_tokens]`` (all views)
        -> ``[..., H, W]`` over the first view's image (default ``H, W`` = its pixels)."""
        if values.shape[-1] != self.n_tokens:
            raise ValueError(f"paint expects {self.n_tokens} values (one per image token), got {values.shape[-1]}")
        return paint_view(values, self.boxes, self.view, view, self.image_size, size)

    def patchify(self, image: torch.Tensor) -> torch.Tensor:
        """``[..., C, H, W]`` over the model's image -> the processor's flattened patches (``patch_layout``)."""
        from .qwen_vl import patchify

        layout = self.patch_layout
        return patchify(image, layout["patch"], layout["merge"], layout["temporal"])

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """Flattened patches ``[..., n_patches, C T P P]`` -> the image ``[..., C, H, W]`` (first frame)."""
        from .qwen_vl import unpatchify

        layout = self.patch_layout
        grid = (self.image_size[0] // layout["patch"], self.image_size[1] // layout["patch"])
        return unpatchify(patches, grid, layout["patch"], layout["merge"], layout["temporal"], layout["channels"])

    def mask_to_pixels(self, masks: torch.Tensor, pixel_shape, mode: str = "bilinear") -> torch.Tensor:
        """:func:`mask_to_pixels` with this geometry's views (masks laid over the first view's image).

        With a ``patch_layout`` (pixel rows ``[n_patches, C T P P]``) the masks are upsampled over the
        image and flattened exactly as the processor flattens pixels: ``[N, n_patches, C T P P]``."""
        if self.patch_layout is not None and len(pixel_shape) == 2:
            return self.patchify(mask_to_pixels(masks, (1, *self.image_size), mode)
                                 .expand(-1, self.patch_layout["channels"], -1, -1))
        return mask_to_pixels(masks, pixel_shape, mode, view_boxes=self.view_boxes, frame_size=self.image_size)


def paint_view(values: torch.Tensor, boxes, views, view: int, frame_size, size=None) -> torch.Tensor:
    """:func:`paint_boxes` of one ``view``'s tokens: ``values`` / ``boxes`` / ``views`` cover every
    image token (``[..., n]``, ``[n, 4]`` in the first view's pixels, ``[n]``)."""
    if boxes is None or views is None:
        raise ValueError("no image-token boxes are known here, so only view 0 (the patch grid) can be drawn")
    views = torch.as_tensor(views)
    chosen = views == view
    if not chosen.any():
        raise ValueError(f"no image token belongs to view {view} (views: {sorted(set(views.tolist()))})")
    return paint_boxes(values[..., chosen.to(values.device)], torch.as_tensor(boxes)[chosen], frame_size, size)


def paint_boxes(values: torch.Tensor, boxes: torch.Tensor, frame_size, size=None) -> torch.Tensor:
    """Paint token values ``[..., n]`` into an ``[..., H, W]`` map of a ``frame_size`` image.

    ``boxes`` ``[n, 4]`` are the tokens' boxes in the image's pixels; they must tile a grid (every
    token of one grid column shares ``x0``, of one grid row ``y0``), as the patches of one view do.
    Each output cell takes the value of the token whose box holds its centre; centres beyond the
    grid's edge (a high-resolution grid trimmed of its padding) take the nearest token's.
    ``size`` defaults to ``frame_size`` (one cell per pixel).
    """
    frame_h, frame_w = (int(v) for v in frame_size)
    height, width = (frame_h, frame_w) if size is None else (int(v) for v in size)
    boxes = torch.as_tensor(boxes, dtype=torch.float32).cpu()
    x_edges, col = boxes[:, 0].unique(return_inverse=True)                         # sorted column starts
    y_edges, row = boxes[:, 1].unique(return_inverse=True)
    table = torch.full((y_edges.numel(), x_edges.numel()), -1, dtype=torch.long)
    table[row, col] = torch.arange(boxes.shape[0])
    if (table < 0).any():
        raise ValueError("the boxes do not tile a full grid (a row / column start without a token)")
    cx = (torch.arange(width) + 0.5) * frame_w / width
    cy = (torch.arange(height) + 0.5) * frame_h / height
    cols = (torch.searchsorted(x_edges, cx, right=True) - 1).clamp(min=0)
    rows = (torch.searchsorted(y_edges, cy, right=True) - 1).clamp(min=0)
    return values[..., table[rows][:, cols].to(values.device)]


def mask_to_pixels(masks: torch.Tensor, pixel_shape, mode: str = "bilinear", *, view_boxes: torch.Tensor | None = None,
                   frame_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Lay masks ``[N, h, w]`` over an image onto the pixels of every view the model sees.

    ``pixel_shape``: one row of pixel values, ``[C, H, W]`` or ``[n_views, C, H, W]``. Returns a
    tensor that broadcasts against ``[N, *pixel_shape]``: ``[N, 1, H, W]`` / ``[N, 1, 1, H, W]``
    when the mask covers the (first) view's pixel grid as it is, or ``[N, n_views, 1, H, W]`` when
    ``view_boxes`` ``[n_views, 4]`` says which box of the first view's ``frame_size`` image each
    view shows (LLaVA-NeXT tiles): each view then samples the mask over its box (``grid_sample``,
    edges extended beyond the image). Upsampling is ``align_corners=False`` for bilinear.
    Differentiable in ``masks``.
    """
    import torch.nn.functional as F

    height, width = (int(v) for v in pixel_shape[-2:])
    n = masks.shape[0]
    if view_boxes is None or len(pixel_shape) < 4:
        out = F.interpolate(masks.unsqueeze(1), size=(height, width), mode=mode, **_corners(mode))
        return out.view(n, *[1] * (len(pixel_shape) - 2), height, width)
    n_views = int(pixel_shape[0])
    if view_boxes.shape[0] < n_views:
        raise ValueError(f"pixel values have {n_views} views but the geometry knows {view_boxes.shape[0]}")
    frame_h, frame_w = frame_size
    boxes = view_boxes[:n_views].to(masks.device, torch.float32)                    # [V, 4]
    fx = (torch.arange(width, device=masks.device) + 0.5) / width                     # pixel centres in [0, 1]
    fy = (torch.arange(height, device=masks.device) + 0.5) / height
    x = boxes[:, 0:1] + fx * (boxes[:, 2:3] - boxes[:, 0:1])                         # [V, W] first-view pixels
    y = boxes[:, 1:2] + fy * (boxes[:, 3:4] - boxes[:, 1:2])                         # [V, H]
    grid = torch.stack([(2 * x / frame_w - 1).unsqueeze(1).expand(-1, height, -1),
                        (2 * y / frame_h - 1).unsqueeze(2).expand(-1, -1, width)], dim=-1)   # [V, H, W, 2]
    grid = grid.reshape(1, n_views * height, width, 2).expand(n, -1, -1, -1)
    out = F.grid_sample(masks.unsqueeze(1).float(), grid, mode=mode, padding_mode="border", align_corners=False)
    return out.view(n, n_views, 1, height, width)


def _rms_gain(norm: nn.Module, eps: float) -> torch.Tensor:
    """The gain an RMS norm applies: its ``weight``, or ``1 + weight`` for Gemma-style norms.

    Read by running the module (its own forward, no hooks) on a vector of ones, whose RMS is 1:
    ``norm(1) = gain / sqrt(1 + eps)``. A norm that is neither form is one clear error.
    """
    weight = norm.weight.detach()
    if weight.device.type == "meta":
        raise AdapterError(f"the weight of {type(norm).__name__} is on the meta device, not in this process (a "
                           "weightless remote=True nnsight client, or a layer offloaded by accelerate), and this score "
                           "reads it here for this model: run with the weights in this process (remote='local' or "
                           "False, or backend='hooks')")
    with torch.no_grad():
        ones = torch.ones(1, weight.shape[-1], dtype=weight.dtype, device=weight.device)
        gain = type(norm).forward(norm, ones).float()[0] * (1 + eps) ** 0.5
    plain, offset = (gain - weight.float()).abs().max(), (gain - 1 - weight.float()).abs().max()
    tolerance = 1e-2 * max(1.0, float(gain.abs().max()))
    if min(plain, offset) > tolerance:
        raise AdapterError(f"the final norm {type(norm).__name__} scales by neither its weight nor 1 + weight; "
                           "the adapter cannot read it as data")
    return weight if plain <= offset else 1 + weight.float()  # (detached: read as data, never trained through)


def module_parameter(module: nn.Module, name: str) -> torch.Tensor | None:
    """``module.<name>`` as a usable tensor, also when accelerate offloaded it (``device_map`` with
    "cpu" / "disk" entries): its dispatch hook keeps the weight in ``weights_map`` and leaves a meta
    tensor on the module between forwards), and when tensor parallelism sharded it (a DTensor: gathered
    across the TP group, a collective every rank makes)."""
    value = module._parameters.get(name)  # (nn.Module.__getattr__ is a Python fallback: read the dict first)
    if value is None:
        value = getattr(module, name, None)
    if value is None or value.device.type != "meta":
        return full_parameter(value) if value is not None else None
    weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
    if weights is not None:
        try:
            return weights[name]
        except KeyError:
            pass
    raise AdapterError(f"{name} of {type(module).__name__} is on the meta device with no offloaded copy to read; load "
                       "the model with its weights (or, for a remote nnsight backend, let the server score)")


def _corners(mode: str) -> dict:
    return {"align_corners": False} if mode in ("bilinear", "bicubic") else {}


#: module paths split once (captures resolve modules per layer on every call)
_PATH_PARTS: dict[str, tuple[str, ...]] = {}


def _child(module: nn.Module, name: str) -> nn.Module:
    """``module.<name>`` for a submodule, read from ``_modules`` directly: ``nn.Module.__getattr__`` is a
    Python fallback that captures would pay for every module they hook, per layer, per call."""
    child = module._modules.get(name)
    return child if child is not None else getattr(module, name)


class AdapterError(ValueError):
    """A model the adapters cannot handle, or an input that does not match the model."""


class ModelAdapter:
    """Module access, dimensions and geometry for one model family.

    Subclasses set the module paths below; the dimension properties read them from the config.
    """

    #: dotted path of the decoder-layer list, relative to the top-level model
    layers_path: str
    final_norm_path: str
    unembed_path: str
    vision_tower_path: str
    projector_path: str
    embed_path: str

    #: why relevancy cannot propagate through this family's vision tower, or None when it can
    vision_relevancy_refusal: str | None = None

    def __init__(self, model: nn.Module):
        self.model = model

    # ----------------------------------------------------------------------------- lookup
    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    def _get(self, path: str) -> nn.Module:
        # Straight through the ``_modules`` dicts: ``get_submodule``'s hasattr/getattr go through
        # nn.Module's slow ``__getattr__`` at every step, and captures look modules up per layer.
        module = self.model
        names = _PATH_PARTS.get(path)
        if names is None:
            names = _PATH_PARTS[path] = tuple(path.split("."))
        for name in names:
            child = module._modules.get(name)
            if child is None:
                return self.model.get_submodule(path)  # its own lookup, and its error
            module = child
        return module

    # ------------------------------------------------------------------------- modules
    @property
    def layers(self) -> nn.ModuleList:
        resolved = self.__dict__.get("_resolved")
        return resolved[0] if resolved is not None else self._get(self.layers_path)

    @contextlib.contextmanager
    def resolving(self) -> Iterator[None]:
        """Inside the block the decoder-layer list and each layer are looked up once (hook registration
        asks for each layer's modules many times; nothing swaps modules of the model inside the block)."""
        if self.__dict__.get("_resolved") is not None:
            yield
            return
        self._resolved = (self._get(self.layers_path), {})
        try:
            yield
        finally:
            self._resolved = None

    def layer(self, index: int) -> nn.Module:
        resolved = self.__dict__.get("_resolved")
        if resolved is not None and index in resolved[1]:
            return resolved[1][index]
        layers = self.layers
        modules = layers._modules  # ModuleList keys its children "0", "1", ...: skips its Python indexing
        n = len(modules)
        if not -n <= index < n:
            self.check_layer(index)  # its error
        module = modules.get(str(index % n))
        module = layers[index] if module is None else module
        if resolved is not None:
            resolved[1][index] = module
        return module

    def attn(self, index: int) -> nn.Module:
        return _child(self.layer(index), "self_attn")

    def q_proj(self, index: int) -> nn.Module:
        return _child(self.attn(index), "q_proj")

    def k_proj(self, index: int) -> nn.Module:
        return _child(self.attn(index), "k_proj")

    def v_proj(self, index: int) -> nn.Module:
        return _child(self.attn(index), "v_proj")

    def o_proj(self, index: int) -> nn.Module:
        return _child(self.attn(index), "o_proj")

    def mlp(self, index: int) -> nn.Module:
        return _child(self.layer(index), "mlp")

    def down_proj(self, index: int) -> nn.Module:
        return _child(self.mlp(index), "down_proj")

    @property
    def final_norm(self) -> nn.Module:
        return self._get(self.final_norm_path)

    @property
    def unembed(self) -> nn.Module:
        return self._get(self.unembed_path)

    @property
    def embed(self) -> nn.Module:
        return self._get(self.embed_path)

    @property
    def vision_tower(self) -> nn.Module:
        return self._get(self.vision_tower_path)

    @property
    def projector(self) -> nn.Module:
        return self._get(self.projector_path)

    # ---------------------------------------------------------------------- dimensions
    @property
    def text_config(self):
        config = self.model.config
        # the config's own __dict__, past transformers' Python __getattribute__ (read many times per call)
        key = (config, object.__getattribute__(config, "__dict__").get("text_config"))
        cached = self.__dict__.get("_text_config")
        if cached is None or cached[0] is not key[0] or cached[1] is not key[1]:
            # get_text_config is slow and read per layer by captures: once per config object
            cached = self._text_config = (*key, config.get_text_config())
        return cached[2]

    @property
    def n_layers(self) -> int:
        return len(self.layers._modules)

    def _text_dims(self) -> dict:
        """The text model's sizes, read once per text config (transformers routes every config
        attribute read through Python; methods ask for these in inner loops)."""
        config = self.text_config
        cached = self.__dict__.get("_dims")
        if cached is None or cached[0] is not config:
            n_heads, d_model = config.num_attention_heads, config.hidden_size
            dims = {"n_heads": n_heads, "d_model": d_model, "d_mlp": getattr(config, "intermediate_size", None),
                    "n_kv_heads": getattr(config, "num_key_value_heads", None) or n_heads,
                    "head_dim": getattr(config, "head_dim", None) or d_model // n_heads,
                    "sliding_window": getattr(config, "sliding_window", None),
                    "layer_types": getattr(config, "layer_types", None)}
            cached = self._dims = (config, dims)
        return cached[1]

    @property
    def n_heads(self) -> int:
        return self._text_dims()["n_heads"]

    @property
    def n_kv_heads(self) -> int:
        return self._text_dims()["n_kv_heads"]

    @property
    def head_dim(self) -> int:
        return self._text_dims()["head_dim"]

    @property
    def d_model(self) -> int:
        return self._text_dims()["d_model"]

    @property
    def d_mlp(self) -> int:
        return self._text_dims()["d_mlp"] or self.text_config.intermediate_size

    def _unembed_weight(self) -> torch.Tensor:
        unembed = self.unembed
        weight = unembed._parameters.get("weight")  # (past nn.Module's slow __getattr__)
        return unembed.weight if weight is None else weight

    @property
    def vocab_size(self) -> int:
        return self._unembed_weight().shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self._unembed_weight().dtype

    @property
    def device(self) -> torch.device:
        return self._unembed_weight().device

    def vision_dtype(self) -> torch.dtype:
        """The dtype pixel values must have for the vision tower: its first parameter's."""
        # the first of ``parameters()`` (modules in pre-order, each its own parameters first), found without
        # the generators behind it: asked on every forward
        pending = [self.vision_tower]
        while pending:
            module = pending.pop()
            for value in module._parameters.values():
                if value is not None:
                    return value.dtype
            pending.extend(reversed([child for child in module._modules.values() if child is not None]))
        raise StopIteration(f"the vision tower {type(self.vision_tower).__name__} has no parameters")

    # ------------------------------------------------------------------------- weights
    def W_O(self, layer: int) -> torch.Tensor:
        """``[n_heads, head_dim, d_model]``: head j writes ``z_j @ W_O[j]`` into the residual."""
        weight = module_parameter(self.o_proj(layer), "weight")  # [d_model, n_heads * head_dim]
        # a view (reshape, not Tensor.unflatten: its Python wrapper costs more than the rest of this call)
        return weight.T.reshape(self.n_heads, -1, weight.shape[0])

    def W_O_head(self, layer: int, head: int) -> torch.Tensor:
        """``[head_dim, d_model]``: ``W_O(layer)[head]``, as a view of that head's columns of o_proj."""
        weight = module_parameter(self.o_proj(layer), "weight")
        head_dim = weight.shape[1] // self.n_heads
        return weight.narrow(1, head * head_dim, head_dim).t()

    def W_O_all(self) -> torch.Tensor:
        """``[n_layers, n_heads, head_dim, d_model]``: :meth:`W_O` of every layer, stacked (one copy)."""
        weights = torch.stack([module_parameter(self.o_proj(layer), "weight") for layer in range(self.n_layers)])
        return weights.transpose(1, 2).reshape(weights.shape[0], self.n_heads, -1, weights.shape[1])

    def b_O(self, layer: int) -> torch.Tensor | None:
        return module_parameter(self.o_proj(layer), "bias")

    def W_down(self, layer: int) -> torch.Tensor:
        """``[d_model, d_mlp]``: neuron k of the MLP writes ``c_k * W_down[:, k]``."""
        return module_parameter(self.down_proj(layer), "weight")

    def final_norm_params(self) -> dict:
        """The final norm as data: ``kind`` ("rms" or "layer"), ``weight`` (the gain it applies),
        ``bias``, ``eps``."""
        norm = self.final_norm
        fields = norm.__dict__  # (plain attributes; nn.Module.__getattr__ is a slow Python fallback)
        eps = fields.get("variance_epsilon", fields.get("eps"))
        if eps is None:
            eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
        if eps is None:
            raise AdapterError(f"cannot read the epsilon of the final norm {type(norm).__name__}")
        if isinstance(norm, nn.LayerNorm):
            return {"kind": "layer", "weight": norm.weight, "bias": norm.bias, "eps": float(eps)}
        # Reading an RMS norm's gain runs the module: keep it while the same weight tensor is unmodified
        # (its version counter moves with every in-place change)
        weight = norm._parameters.get("weight")
        weight = norm.weight if weight is None else weight
        key = (norm, weight, weight._version, float(eps))
        cached = self.__dict__.get("_rms_params")
        if cached is None or any(a is not b for a, b in zip(cached[0][:2], key[:2])) or cached[0][2:] != key[2:]:
            cached = self._rms_params = (key, {"kind": "rms", "weight": _rms_gain(norm, float(eps)),
                                               "bias": getattr(norm, "bias", None), "eps": float(eps)})
        return dict(cached[1])

    # ------------------------------------------------------------------------ checks
    def check_layer(self, index: int) -> int:
        n = len(self.layers._modules)
        if not -n <= index < n:
            raise IndexError(f"layer {index} is out of range: the model has {n} layers (0..{n - 1})")
        return index % n

    def check_head(self, head: int) -> int:
        if not 0 <= head < self.n_heads:
            raise IndexError(f"head {head} is out of range: the model has {self.n_heads} heads (0..{self.n_heads - 1})")
        return head

    # ------------------------------------------------------------------------ attention
    def rotate_qk(self, layer: int, q: torch.Tensor, k: torch.Tensor, position_embeddings):
        """Apply the layer's positional rotation to ``q`` ``[B, H, Q, hd]`` and ``k`` ``[B, KV, S, hd]``."""
        raise NotImplementedError

    def rotary_function(self, layer: int):
        """A module-level function ``(q, k, cos, sin) -> (q_rot, k_rot)`` equal to :meth:`rotate_qk`, that
        can run where the model is (a remote trace ships it by reference); None when there is none."""
        return None

    def attention_scaling(self, layer: int) -> float:
        attn = self.attn(layer)
        scaling = attn.__dict__.get("scaling")  # (HF sets a plain attribute: read without a module __getattr__)
        if scaling is None:
            scaling = getattr(attn, "scaling", None)
        return float(scaling if scaling is not None else self.head_dim ** -0.5)

    def sliding_window(self, layer: int) -> int | None:
        """Keys a query of ``layer`` may see, counting itself, or None for full causal attention.

        HF's rule: a layer slides when ``config.layer_types`` names it ``"sliding_attention"``, or,
        for configs without ``layer_types`` (Mistral), whenever ``config.sliding_window`` is set.
        """
        dims = self._text_dims()
        window, types = dims["sliding_window"], dims["layer_types"]
        if types is not None:
            return int(window) if window is not None and types[self.check_layer(layer)] == "sliding_attention" else None
        return int(window) if window is not None else None

    # ------------------------------------------------------------------------ inputs
    def prepared_pixels(self, encoding: dict) -> torch.Tensor:
        """``PreparedInput.pixel_values`` (one row) from the processor's output."""
        return encoding["pixel_values"]

    def model_inputs(self, inputs: dict) -> dict:
        """The model's keyword arguments from the library's batched form (rows of pixel values, one per
        sequence); LLaVA takes them as they are."""
        return inputs

    def check_image_size(self, width: int, height: int, image_processor=None) -> None:
        """One clear error for an image the model cannot see (any size is fine for fixed-size towers)."""

    def vision_outputs(self, output, grid_thw=None) -> dict | None:
        """``{"projector_out", "vision_features"}`` from the output of ``projector`` when it is a whole
        vision module (Qwen-VL); None: the projector's own input and output are those (LLaVA)."""
        return None

    def vision_rows(self, value: torch.Tensor) -> torch.Tensor:
        """The projector's input / output as captured (``vision_features`` / ``projector_out``) with one
        row per image batch, ``[n_images, n, d]``: as it is for most families; Mistral-3's model squeezes
        that axis before its projector, so it restores it."""
        return value

    def deepstack_layers(self) -> list[int]:
        """Decoder layers after which the model adds vision features to the residual stream outside the
        layer modules (Qwen3-VL's DeepStack); empty for most families."""
        return []

    def deepstack_additions(self, text_kwargs: dict, embeds: torch.Tensor) -> dict[int, torch.Tensor]:
        """``{layer: [B, S, d]}`` what the text model, called with ``text_kwargs``, adds to the residual
        after ``layer`` outside the layer modules; empty for most families."""
        return {}

    @property
    def text_model(self) -> nn.Module:
        """The module that runs the decoder layers (the parent of ``layers``)."""
        return self._get(self.layers_path.rsplit(".", 1)[0])

    def normalise_qk(self, layer: int, q: torch.Tensor | None = None, k: torch.Tensor | None = None):
        """Raw projections ``[B, S, heads * hd]`` -> what the layer rotates (QK-norm where the model has
        one, :meth:`qk_norm`); ``(q, k)``, None passed through."""
        return (None if q is None else self.qk_norm(layer, "q", q),
                None if k is None else self.qk_norm(layer, "k", k))

    # ------------------------------------------------- block outputs, attention masks, logit caps
    # Defaults describe a pre-norm Llama-like layer with causal attention: a family that differs
    # (Gemma-3's sandwich norms, bidirectional image blocks) overrides these, and captures, the
    # interventions, attention_rows and the frozen-norm scorer follow.
    def attn_out_module(self, layer: int) -> nn.Module:
        """The module whose output is what the attention block adds to the residual stream."""
        return self.attn(layer)

    def mlp_out_module(self, layer: int) -> nn.Module:
        """The module whose output is what the MLP block adds to the residual stream."""
        return self.mlp(layer)

    def resid_mid_module(self, layer: int) -> nn.Module:
        """The module whose input is the residual stream between the attention and MLP blocks."""
        return _child(self.layer(layer), "post_attention_layernorm")

    def output_norm(self, layer: int, block: str) -> nn.Module | None:
        """The RMS norm applied to block ``block``'s (``"attn"`` / ``"mlp"``) output before the
        residual add (Gemma-3's post-norms), or None when the raw output is added."""
        return None

    def frozen_output_norm(self, layer: int, block: str, raw: torch.Tensor):
        """``(scale [..., 1], gain [d])`` float32 such that the block adds ``raw * scale * gain`` for
        the raw block output ``raw`` ``[..., d]`` (``o_proj`` / ``down_proj`` output), with the norm's
        scale frozen at ``raw``'s value; None when the block adds ``raw`` itself.

        With the scale frozen, the post-normed output is linear in ``raw``: each head's (neuron's)
        share ``raw_j * scale * gain`` sums to the block output exactly.
        """
        norm = self.output_norm(layer, block)
        if norm is None:
            return None
        eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6)))
        scale = torch.rsqrt(raw.float().pow(2).mean(-1, keepdim=True) + eps)
        return scale, _rms_gain(norm, eps).detach().float().to(raw.device)

    def qk_norm(self, layer: int, which: str, x: torch.Tensor) -> torch.Tensor:
        """Raw projections ``[..., heads * head_dim]`` of ``which`` ("q" / "k") as the attention uses
        them before the rotation (QK-norm); unchanged when the layer has none."""
        return x

    def attention_blocks(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """``[B, S]``: the bidirectional block each position belongs to (``-1``: plain causal), as
        the model's own mask builds it, or None when attention is causal everywhere."""
        return None

    @property
    def patches_per_image_token(self) -> int:
        """Vision-tower patch tokens merged into one image token by the connector (1: LLaVA's MLP
        maps each patch to its own token; Gemma-3 average-pools, pixel-shuffle connectors merge)."""
        return 1

    def logit_softcap(self) -> float | None:
        """``c`` when the model's forward returns ``c * tanh(logits / c)`` (None: plain logits)."""
        return None

    # ------------------------------------------------------------------------ geometry
    @property
    def image_token_id(self) -> int:
        raise NotImplementedError

    def tokens_per_image(self) -> int:
        raise NotImplementedError

    def bind_processor(self, processor) -> None:
        """Read what the geometry needs from the processor (``VQAModel`` calls it): the ids of marker
        tokens that only the tokenizer knows (Idefics3's ``<row_i_col_j>``). Default: nothing."""

    def image_geometry(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                       image_sizes: torch.Tensor | None = None) -> ImageGeometry:
        """Geometry of the image tokens of one sequence ``input_ids`` ``[S]`` (``pixel_values`` and,
        for models that tile images, ``image_sizes`` as the processor returned them)."""
        raise NotImplementedError

    def pixel_transform(self, image_processor, original_size, model_size) -> tuple[float, float, float, float]:
        """``(sx, sy, dx, dy)``: original pixel ``(x, y)`` -> ``(x sx - dx, y sy - dy)`` in the first view.

        Default: CLIP's shortest-edge resize then centre crop when the processor does that, else a
        plain stretch to the model's size.
        """
        width, height = original_size
        out_h, out_w = model_size
        size = getattr(image_processor, "size", None)
        shortest = size.get("shortest_edge") if isinstance(size, dict) else getattr(size, "shortest_edge", None)
        if shortest and getattr(image_processor, "do_center_crop", False):
            scale = shortest / min(width, height)
            resized_w, resized_h = round(width * scale), round(height * scale)
            return (resized_w / width, resized_h / height, (resized_w - out_w) // 2, (resized_h - out_h) // 2)
        return (out_w / width, out_h / height, 0.0, 0.0)


class MergedPatchGrid:
    """Geometry shared by families whose images keep their own size and whose connector merges
    ``merge_size x merge_size`` vision patches into one image token (Qwen-VL, Mistral-3 / Pixtral): no
    fixed patch grid, no CLS token. Subclasses give ``patch_size`` and ``merge_size``; list it before
    the adapter base class."""

    @property
    def token_size(self) -> int:
        """Pixels per side of one image token (``patch_size * merge_size``)."""
        return self.patch_size * self.merge_size

    @property
    def patch_grid(self):
        """None: the grid depends on each image's size (read it from ``inp.geometry.grid``)."""
        return None

    @property
    def has_cls_token(self) -> bool:
        return False

    @property
    def patches_per_image_token(self) -> int:
        return self.merge_size ** 2  # the merger folds merge x merge vision patches into each token


class PixelShuffleTiles:
    """Geometry shared by families whose connector folds ``shuffle x shuffle`` vision patches of a square
    tile into one image token (InternVL, Idefics3 / SmolVLM). Subclasses give ``tile_size``,
    ``vision_patch`` (pixels per vision patch) and ``shuffle``; list it before the adapter base class."""

    @property
    def patch_grid(self) -> tuple[int, int]:
        side = self.tile_size // self.vision_patch // self.shuffle
        return side, side

    @property
    def patch_size(self) -> int:
        return self.tile_size // self.patch_grid[0]

    @property
    def has_cls_token(self) -> bool:
        return False  # image tokens are all patches (InternVL's "default" strategy drops the CLS before the shuffle)

    @property
    def patches_per_image_token(self) -> int:
        return self.shuffle ** 2

    def tokens_per_image(self) -> int:
        rows, cols = self.patch_grid
        return rows * cols

    def _tiled_layout(self, tiles: list[tuple[int, int]], rows: int, cols: int) -> dict:
        """``rowcol``, ``boxes``, ``view`` and ``view_boxes`` of every image token for tile views at 0-based
        ``(row, col)`` of a ``rows x cols`` grid, in that order, then the whole image (the last view, the
        frame all boxes are drawn in). Each token's box is read from the patches the connector's own
        ``pixel_shuffle`` folds into it (``_shuffled_patches``)."""
        frame, cell, side = self.tile_size, self.vision_patch, self.patch_grid[0]
        patches = self._shuffled_patches()                                      # [n, k, 2] local (row, col)
        low, high = patches.amin(1), patches.amax(1)                           # [n, 2]
        if not bool(((high - low + 1) == self.shuffle).all()):
            raise AdapterError("the connector's pixel_shuffle does not fold square blocks of patches into one token")
        local_rc = low // self.shuffle
        local_boxes = torch.cat([low.flip(1) * cell, (high.flip(1) + 1) * cell], 1).float()   # x0, y0, x1, y1
        boxes, rowcol, view, view_boxes = [], [], [], []
        for tile in [*tiles, None]:
            if tile is None:  # the whole image
                box = torch.tensor([0.0, 0.0, frame, frame])
                rowcol.append(local_rc)
            else:
                r, c = tile
                box = torch.tensor([c * frame / cols, r * frame / rows, (c + 1) * frame / cols, (r + 1) * frame / rows])
                rowcol.append(local_rc + torch.tensor([r * side, c * side]))
            scale = (box[2:] - box[:2]) / frame
            boxes.append(local_boxes * scale.repeat(2) + box[:2].repeat(2))
            view.append(torch.full((len(local_rc),), 0 if tile is None else 1))
            view_boxes.append(box)
        return {"rowcol": torch.cat(rowcol), "boxes": torch.cat(boxes), "view": torch.cat(view).long(),
                "view_boxes": torch.stack(view_boxes) if tiles else None}


_ADAPTERS: list[type[ModelAdapter]] = []


def register_adapter(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    """Class decorator: make an adapter available to :func:`get_adapter` (newest first)."""
    _ADAPTERS.insert(0, cls)
    return cls


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for ``model``, or one clear error naming the class and the supported ones."""
    for cls in _ADAPTERS:
        if cls.handles(model):
            return cls(model)
    known = ", ".join(sorted({c.__name__ for c in _ADAPTERS}))
    raise AdapterError(
        f"no mech_vqa adapter knows {type(model).__name__}. Supported adapters: {known}. "
        "Load a LlavaForConditionalGeneration, or write a ModelAdapter subclass and decorate it "
        "with @mech_vqa.adapters.register_adapter."
    )
