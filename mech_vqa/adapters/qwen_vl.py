"""Adapters for HF ``Qwen2VLForConditionalGeneration``, ``Qwen2_5_VLForConditionalGeneration`` and
``Qwen3VLForConditionalGeneration`` (transformers 5.x).

Layout::

    model.model.visual                      ViT on flattened patches (+ merger: 2 x 2 patches -> one token)
    model.model.language_model.layers[i]    Qwen2 / Qwen3 decoder layers (q/k/v biases; Qwen3: QK-norm)
    model.model.language_model.norm, model.lm_head

Image. The processor resizes the image to multiples of ``patch * merge`` pixels within its min / max
pixel budget (``smart_resize``), normalises it, and returns ``pixel_values`` as flattened patches
``[n_patches, C * T * P * P]`` (each frame repeated ``T = temporal_patch_size`` times), ordered so
that every ``merge x merge`` block is contiguous, plus ``image_grid_thw`` ``[n_images, 3]`` (grid in
patches). The prompt holds ``<|vision_start|><|image_pad|> x N <|vision_end|>`` with ``N = h w /
merge^2`` tokens in raster order of the merged grid; their positions are 3-axis M-RoPE (temporal,
height, width) computed by the model from the grid (``get_rope_index``). The rotary angles each
decoder layer receives (``position_embeddings``) already combine the three axes, so recomputed
attention rows use them as the layer got them.

Here ``PreparedInput.pixel_values`` are the processor's patches with a batch dimension, ``[1,
n_patches, C T P P]``; :meth:`QwenVLAdapter.model_inputs` folds rows back into the model's flat
list. Masks (iGOS, insertion/deletion) are laid over the resized image and re-flattened exactly as
the processor flattens pixels (:func:`patchify`), so ``mask * image + (1 - mask) * baseline`` on
patches equals blending the images and then patchifying.

Qwen3-VL adds **DeepStack**: features of some ViT layers, merged like the last one, are added to the
residual stream at the image positions right after the first decoder layers, outside those layers'
modules. The adapter names that addition (:meth:`QwenVLAdapter.deepstack_layers`); the capture
records it as ``deepstack`` so decompositions of the residual keep it as a term of its own.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterError, ImageGeometry, MergedPatchGrid, register_adapter
from .llava import LlavaAdapter


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The processor's resize rule (``transformers ... qwen2_vl.image_processing_pil_qwen2_vl.smart_resize``),
    imported from transformers so the geometry cannot drift from it."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as hf_smart_resize

    return hf_smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)


def patchify(image: torch.Tensor, patch: int, merge: int, temporal: int) -> torch.Tensor:
    """``[..., C, H, W]`` -> ``[..., n_patches, C * T * P * P]``: the Qwen-VL processor's flattening
    (merge blocks contiguous, each frame repeated ``temporal`` times), differentiable."""
    *lead, channels, height, width = image.shape
    rows, cols = height // patch, width // patch
    x = image.reshape(*lead, channels, rows // merge, merge, patch, cols // merge, merge, patch)
    n = len(lead)
    # (C, R/m, m, P, Cc/m, m, P) -> (R/m, Cc/m, m, m, C, P, P)
    x = x.permute(*range(n), n + 1, n + 4, n + 2, n + 5, n, n + 3, n + 6)
    x = x.unsqueeze(-3).expand(*x.shape[:-2], temporal, patch, patch)
    return x.reshape(*lead, rows * cols, channels * temporal * patch * patch)


def unpatchify(patches: torch.Tensor, grid: tuple[int, int], patch: int, merge: int, temporal: int,
               channels: int = 3) -> torch.Tensor:
    """Inverse of :func:`patchify` (first frame): ``[..., n_patches, C T P P]`` -> ``[..., C, H, W]``,
    ``grid`` = ``(rows, cols)`` in patches."""
    *lead, n_patches, _ = patches.shape
    rows, cols = grid
    if n_patches != rows * cols:
        raise ValueError(f"{n_patches} patches do not fill a {rows} x {cols} patch grid")
    x = patches.reshape(*lead, rows // merge, cols // merge, merge, merge, channels, temporal, patch, patch)
    x = x.select(-3, 0)                                                      # first frame
    n = len(lead)
    # (R/m, C/m, m, m, C, P, P) -> (C, R/m, m, P, C/m, m, P)
    x = x.permute(*range(n), n + 4, n, n + 2, n + 5, n + 1, n + 3, n + 6)
    return x.reshape(*lead, channels, rows * patch, cols * patch)


@register_adapter
class QwenVLAdapter(MergedPatchGrid, LlavaAdapter):
    """Qwen2-VL (and the base of Qwen2.5-VL / Qwen3-VL): dynamic-resolution images, one image per prompt,
    M-RoPE. The text model is Llama-like, so the module access and the rotation are LLaVA's."""

    layers_path = "model.language_model.layers"
    final_norm_path = "model.language_model.norm"
    embed_path = "model.language_model.embed_tokens"
    vision_tower_path = "model.visual"
    #: the whole visual module: its pooled output is the merged, raster-ordered image tokens (Qwen2.5-VL's
    #: merger itself works in window order and the visual module reorders after it)
    projector_path = "model.visual"
    unembed_path = "lm_head"
    CLASSES = ("Qwen2VLForConditionalGeneration",)
    vision_relevancy_refusal = (
        "its ViT attention modules return no attention probabilities (only their output), attend per image "
        "over the flattened patch list (Qwen2.5-VL: within windows in most blocks) and feed a 2 x 2 patch merger, "
        "so Chefer's rule has no probabilities to propagate")

    def __init__(self, model: nn.Module):
        self.model = model
        try:
            model.get_submodule(self.layers_path)
        except AttributeError as err:
            raise AdapterError(f"{type(model).__name__} has no decoder layers at {self.layers_path} "
                               "(transformers 5.x layout expected)") from err
        self._check_layer_modules()

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return type(model).__name__ in cls.CLASSES

    # ------------------------------------------------------------------------ geometry
    @property
    def vision_config(self):
        return self.model.config.vision_config

    @property
    def patch_size(self) -> int:
        return int(self.vision_config.patch_size)

    @property
    def merge_size(self) -> int:
        return int(self.vision_config.spatial_merge_size)

    @property
    def temporal_patch_size(self) -> int:
        return int(self.vision_config.temporal_patch_size)

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def video_token_id(self) -> int | None:
        token = getattr(self.model.config, "video_token_id", None)
        return None if token is None else int(token)

    def tokens_per_image(self) -> int:
        raise AdapterError(f"{type(self.model).__name__} gives a number of image tokens that depends on the "
                           "image's size; use image_geometry(input_ids, pixel_values, image_grid_thw)")

    def patch_layout(self) -> dict:
        return {"patch": self.patch_size, "merge": self.merge_size, "temporal": self.temporal_patch_size,
                "channels": int(getattr(self.vision_config, "in_channels", 3))}

    def check_image_size(self, width: int, height: int, image_processor=None) -> None:
        """One clear error for an image smaller than one merged token (its pixels would all be invented
        by upsampling) or whose aspect ratio the processor refuses."""
        side = self.token_size
        if min(width, height) < side:
            raise AdapterError(
                f"the image is {width} x {height} pixels, smaller than one image token of "
                f"{type(self.model).__name__} ({side} x {side} px: {self.patch_size} px patches merged "
                f"{self.merge_size} x {self.merge_size}); resize or pad it to at least {side} x {side}")
        if max(width, height) / min(width, height) > 200:
            raise AdapterError(f"the image is {width} x {height} pixels: an aspect ratio above 200, which the "
                               "Qwen-VL processor refuses; crop or pad it")

    def image_geometry(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                       image_sizes: torch.Tensor | None = None) -> ImageGeometry:
        """Geometry of one sequence's image tokens. ``image_sizes``: the processor's ``image_grid_thw``
        ``[n_images, 3]`` (patches along time, height, width)."""
        if input_ids.dim() != 1:
            raise ValueError(f"image_geometry takes one sequence [S], got shape {tuple(input_ids.shape)}")
        video = self.video_token_id
        if video is not None and bool((input_ids == video).any()):
            raise AdapterError("the prompt holds video tokens: mech_vqa explains images; pass one image "
                               "(images=...) and no video to the processor")
        if image_sizes is None:
            raise AdapterError(f"{type(self.model).__name__} geometry needs image_grid_thw (the processor returns "
                               "it with pixel_values); build inputs with VQAModel.prepare()")
        grid_thw = torch.as_tensor(image_sizes).reshape(-1, 3).cpu()
        if grid_thw.shape[0] != 1:
            raise AdapterError(f"one image per prompt is supported for {type(self.model).__name__}, "
                               f"got {grid_thw.shape[0]} (image_grid_thw {grid_thw.tolist()})")
        frames, patch_rows, patch_cols = (int(v) for v in grid_thw[0])
        if frames != 1:
            raise AdapterError(f"image_grid_thw {grid_thw[0].tolist()} has {frames} temporal patches: that is a "
                               "video; mech_vqa explains single images")
        merge = self.merge_size
        if patch_rows % merge or patch_cols % merge or patch_rows < merge or patch_cols < merge:
            raise AdapterError(f"image_grid_thw {grid_thw[0].tolist()} is not a whole number of "
                               f"{merge} x {merge} merged patches; let the processor build it")
        found = (input_ids == self.image_token_id).nonzero().flatten().cpu()
        if found.numel() == 0:
            raise AdapterError(f"the prompt has no image token (id {self.image_token_id}); put the processor's "
                               "image token ('<|image_pad|>') in the text, or build inputs with VQAModel.prepare()")
        rows, cols = patch_rows // merge, patch_cols // merge
        if found.numel() != rows * cols:
            raise AdapterError(
                f"the prompt has {found.numel()} image tokens but image_grid_thw {grid_thw[0].tolist()} gives "
                f"{rows} x {cols} = {rows * cols} merged tokens; let the processor expand '<|image_pad|>' "
                "(pass images= together with text=) instead of writing image tokens by hand")
        if pixel_values is not None:
            n_patches = int(pixel_values.reshape(-1, pixel_values.shape[-1]).shape[0])
            if n_patches != patch_rows * patch_cols:
                raise AdapterError(f"pixel_values hold {n_patches} patches but image_grid_thw "
                                   f"{grid_thw[0].tolist()} says {patch_rows * patch_cols}; pass the processor's "
                                   "pixel_values and image_grid_thw together")
        index = torch.arange(rows * cols)
        rowcol = torch.stack([index // cols, index % cols], dim=1)
        side = self.token_size
        boxes = torch.stack([rowcol[:, 1] * side, rowcol[:, 0] * side,
                             (rowcol[:, 1] + 1) * side, (rowcol[:, 0] + 1) * side], dim=1).float()
        return ImageGeometry(positions=found, rowcol=rowcol, boxes=boxes, grid=(rows, cols),
                             image_size=(patch_rows * self.patch_size, patch_cols * self.patch_size),
                             view=torch.zeros(rows * cols, dtype=torch.long), patch_layout=self.patch_layout())

    def pixel_transform(self, image_processor, original_size, model_size) -> tuple[float, float, float, float]:
        # smart_resize stretches the whole image to the model's size (no crop, no padding)
        width, height = original_size
        out_h, out_w = model_size
        return (out_w / width, out_h / height, 0.0, 0.0)

    # ------------------------------------------------------------------------- inputs
    def prepared_pixels(self, encoding: dict) -> torch.Tensor:
        """``PreparedInput.pixel_values`` from the processor's output: ``[1, n_patches, C T P P]``."""
        return torch.as_tensor(encoding["pixel_values"]).unsqueeze(0)

    def model_inputs(self, inputs: dict) -> dict:
        """Keyword arguments as the model wants them from the library's batched form.

        Pixel rows ``[N, n_patches, D]`` become the model's flat patch list (one image per row, the grid
        repeated to match); ``mm_token_type_ids`` follow ``input_ids`` (cut with a cut sequence, expanded
        with its rows); 2-D ``position_ids`` (the library's left-padding positions) are dropped, since the
        model computes M-RoPE positions from the grid and the attention mask.
        """
        out = dict(inputs)
        pixels = out.get("pixel_values")
        ids = out.get("input_ids")
        if torch.is_tensor(pixels) and pixels.dim() == 3:
            grid = out.get("image_grid_thw")
            if grid is not None and grid.shape[0] == 1 and pixels.shape[0] > 1:
                out["image_grid_thw"] = grid.expand(pixels.shape[0], -1)
            out["pixel_values"] = pixels.reshape(-1, pixels.shape[-1])
        types = out.get("mm_token_type_ids")
        if torch.is_tensor(types) and torch.is_tensor(ids):
            if types.shape[1] != ids.shape[1]:
                types = types[:, :ids.shape[1]]
            if types.shape[0] != ids.shape[0]:
                types = types.expand(ids.shape[0], -1)
            out["mm_token_type_ids"] = types
        position_ids = out.get("position_ids")
        if torch.is_tensor(position_ids) and position_ids.dim() == 2:
            del out["position_ids"]
        self._check_inputs(out)
        return out

    def _check_inputs(self, inputs: dict) -> None:
        """One clear error, before any forward, for videos and for grids that do not match the prompt."""
        if inputs.get("pixel_values_videos") is not None or inputs.get("video_grid_thw") is not None:
            raise AdapterError("the inputs hold a video (pixel_values_videos / video_grid_thw): mech_vqa explains "
                               "images; pass one image per prompt")
        ids, grid, pixels = inputs.get("input_ids"), inputs.get("image_grid_thw"), inputs.get("pixel_values")
        if not (torch.is_tensor(ids) and torch.is_tensor(grid)):
            return
        if grid.shape[0] != ids.shape[0]:
            raise AdapterError(f"image_grid_thw has {grid.shape[0]} rows for {ids.shape[0]} sequences; one image per "
                               "prompt is supported (build inputs with VQAModel.prepare / VQAModel.batch)")
        tokens = (ids == self.image_token_id).sum(-1).cpu()
        expected = grid.prod(-1).cpu() // self.merge_size ** 2
        if not torch.equal(tokens, expected):
            raise AdapterError(f"the prompts hold {tokens.tolist()} image tokens but image_grid_thw {grid.tolist()} "
                               f"gives {expected.tolist()} merged tokens; pass the processor's image_grid_thw with "
                               "its input_ids (VQAModel.prepare) rather than editing either")
        if torch.is_tensor(pixels) and pixels.shape[0] != int(grid.prod(-1).sum()):
            raise AdapterError(f"pixel_values hold {pixels.shape[0]} patches but image_grid_thw {grid.tolist()} says "
                               f"{int(grid.prod(-1).sum())}; pass the processor's pixel_values and image_grid_thw together")

    # ------------------------------------------------------------------------ captures
    def vision_outputs(self, output, grid_thw=None) -> dict:
        """``{"projector_out": [1, n_tokens, d_model], "vision_features": [1, n_patches, d_vision]}`` from
        the visual module's output: the merged tokens in prompt order, and the last ViT block's output in
        the processor's patch order."""
        features, merged = output.last_hidden_state, output.pooler_output
        if isinstance(merged, (tuple, list)):  # get_image_features splits the same object per image afterwards
            merged = torch.cat(list(merged))
        return {"projector_out": merged.unsqueeze(0), "vision_features": features.unsqueeze(0)}

    def deepstack_layers(self) -> list[int]:
        """Decoder layers after which DeepStack adds ViT features (none before Qwen3-VL)."""
        return []

    def vision_blocks(self) -> list[nn.Module]:
        return list(self.vision_tower.blocks)


@register_adapter
class Qwen25VLAdapter(QwenVLAdapter):
    """Qwen2.5-VL: as Qwen2-VL; the ViT attends within windows except in ``fullatt_block_indexes``, and
    works in window order inside (the visual module restores the raster order of the merged tokens)."""

    CLASSES = ("Qwen2_5_VLForConditionalGeneration",)

    def vision_outputs(self, output, grid_thw=None) -> dict:
        out = super().vision_outputs(output, grid_thw)
        if grid_thw is not None:  # the ViT's last hidden state is in window order: put it back in patch order
            from transformers.vision_utils import get_vision_window_index

            visual = self.vision_tower
            window_index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                                      window_size=visual.window_size, patch_size=visual.patch_size)
            unit = visual.spatial_merge_unit
            features = output.last_hidden_state
            grouped = features.reshape(-1, unit, features.shape[-1])[torch.argsort(window_index.to(features.device))]
            out["vision_features"] = grouped.reshape(1, -1, features.shape[-1])
        return out


@register_adapter
class Qwen3VLAdapter(QwenVLAdapter):
    """Qwen3-VL: 16 px patches, interleaved M-RoPE, QK-norm in the text attention and DeepStack."""

    CLASSES = ("Qwen3VLForConditionalGeneration",)

    vision_relevancy_refusal = (
        "its ViT attention modules return no attention probabilities (only their output), and DeepStack feeds "
        "features of several ViT layers to the first decoder layers, so Chefer's rule has no single path to follow")

    def deepstack_layers(self) -> list[int]:
        return list(range(len(getattr(self.vision_config, "deepstack_visual_indexes", ()) or ())))

    def deepstack_additions(self, text_kwargs: dict, embeds: torch.Tensor) -> dict[int, torch.Tensor]:
        # the text model's own rule (Qwen3VLTextModel._deepstack_process): after layer l, the l-th
        # DeepStack feature is added at the visual positions, in the residual's dtype
        features, mask = text_kwargs.get("deepstack_visual_embeds"), text_kwargs.get("visual_pos_masks")
        if features is None or mask is None:
            return {}
        out = {}
        for layer, feature in enumerate(features):
            added = torch.zeros_like(embeds)
            added[mask.to(embeds.device)] = feature.to(embeds.device, embeds.dtype)
            out[layer] = added
        return out

    def qk_norm(self, layer: int, which: str, x: torch.Tensor) -> torch.Tensor:
        # QK-norm: an RMS norm over each head's vector, before the rotation (the layer's own modules)
        attn = self.attn(layer)
        norm = attn.q_norm if which == "q" else attn.k_norm
        return norm(x.unflatten(-1, (-1, self.head_dim))).flatten(-2)

