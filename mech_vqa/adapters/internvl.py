"""Adapter for HF ``InternVLForConditionalGeneration`` (InternVL 2.5 / 3 in transformers' own format).

Module paths are LLaVA's (``model.model.language_model``, ``model.model.vision_tower``,
``model.model.multi_modal_projector``, ``lm_head``); the text model is a pre-norm Qwen2 / Llama.

Images: the processor (GOT-OCR2's) picks the grid of ``cols x rows`` tiles (between its
``min_patches`` and ``max_patches``) whose aspect ratio is closest to the image's, stretches the
image onto it and cuts ``T x T`` tiles (448 px at every published size), row-major; with more than
one tile it appends a thumbnail, the whole image stretched to ``T x T``. ``pixel_values`` is
``[n_views, 3, T, T]``. Each view's ``g x g`` patch features (class token dropped) go through the
model's ``pixel_shuffle(0.5)``, which folds every ``2 x 2`` block of patches into one token:
``(g / 2)^2`` tokens per view (256 at 448 px), all of them, view after view, between ``<img>`` and
``</img>``, with no marker between tiles.

The geometry runs the model's own ``pixel_shuffle`` on index features (each patch replaced by its
``(row, col)``), so every token's patches, and its box, are what the model merged. The frame is the
whole image at ``T x T`` (the thumbnail, or the single tile): view 0 is the thumbnail's tokens (the
single tile's when there is one), view 1 every tile's tokens on the ``rows * g/2 x cols * g/2`` grid of
the stretched canvas; all boxes and ``view_boxes`` (one per ``pixel_values`` view) are in the frame's
pixels, and map to the original image by ``pixel_transform``'s stretch. The tile grid is recovered
from the original size (``image_sizes``) with the processor's own ``get_optimal_tiled_canvas``.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterError, ImageGeometry, PixelShuffleTiles, register_adapter
from .llava import LlavaAdapter


@register_adapter
class InternVLAdapter(PixelShuffleTiles, LlavaAdapter):
    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "InternVLForConditionalGeneration"

    @property
    def tile_size(self) -> int:
        size = self.model.config.vision_config.image_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def vision_patch(self) -> int:
        size = self.model.config.vision_config.patch_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    @property
    def shuffle(self) -> int:
        """Patches per side folded into one token (``1 / downsample_ratio``)."""
        return int(round(1 / self.model.config.downsample_ratio))

    def _shuffled_patches(self) -> torch.Tensor:
        """``[tokens per view, shuffle^2, 2]``: the ``(row, col)`` of the vision patches the model's own
        ``pixel_shuffle`` folds into each token, in the token order it produces."""
        g = self.tile_size // self.vision_patch
        index = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).float()
        inner = getattr(self.model, "model", self.model)
        folded = inner.pixel_shuffle(index.view(1, g, g, 2), scale_factor=self.model.config.downsample_ratio)
        return folded.reshape(-1, self.shuffle ** 2, 2).long()

    def _tile_grid(self, image_sizes, n_tiles: int) -> tuple[int, int]:
        """``(cols, rows)`` of the processor's tiles for an original ``(height, width)``."""
        if n_tiles == 1:
            return 1, 1
        if image_sizes is None:
            raise AdapterError(f"{n_tiles} tiles need the original image size to know their grid; build inputs "
                               "with VQAModel.prepare() (or pass image_sizes=[[height, width]])")
        from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

        height, width = (int(v) for v in torch.as_tensor(image_sizes).reshape(-1, 2)[0])
        cols, rows = get_optimal_tiled_canvas((height, width), (self.tile_size, self.tile_size), n_tiles, n_tiles)
        if cols * rows != n_tiles:
            raise AdapterError(f"no {n_tiles}-tile grid fits a {width} x {height} image")
        return cols, rows

    def image_geometry(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                       image_sizes: torch.Tensor | None = None) -> ImageGeometry:
        if input_ids.dim() != 1:
            raise ValueError(f"image_geometry takes one sequence [S], got shape {tuple(input_ids.shape)}")
        found = (input_ids == self.image_token_id).nonzero().flatten().cpu()
        if found.numel() == 0:
            raise AdapterError(f"the prompt has no image token (id {self.image_token_id}); put the processor's image "
                               "token ('<IMG_CONTEXT>') in the text, or build inputs with VQAModel.prepare()")
        per_view = self.tokens_per_image()
        n_views = 1 if pixel_values is None else int(pixel_values.shape[0])
        if found.numel() != n_views * per_view:
            raise AdapterError(f"the prompt has {found.numel()} image tokens but {n_views} view(s) of pixel values give "
                               f"{n_views * per_view}; one image per prompt, expanded by the processor")
        n_tiles = n_views - 1 if n_views > 1 else 1
        cols, rows = self._tile_grid(image_sizes, n_tiles)
        tiles = [divmod(index, cols) for index in range(n_views - 1)] if n_views > 1 else []   # thumbnail last
        return ImageGeometry(positions=found, grid=self.patch_grid, image_size=(self.tile_size, self.tile_size),
                             **self._tiled_layout(tiles, rows, cols))

    def pixel_transform(self, image_processor, original_size, model_size) -> tuple[float, float, float, float]:
        width, height = original_size  # the frame is the whole image stretched to the tile size
        out_h, out_w = model_size
        return (out_w / width, out_h / height, 0.0, 0.0)
