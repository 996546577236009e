"""Adapters for HF ``LlavaNextForConditionalGeneration`` (LLaVA-NeXT / LLaVA-1.6, "anyres" tiling) and
``LlavaOnevisionForConditionalGeneration`` (the same tiling, with a downsampled high-resolution grid).

The language model and its module paths are LLaVA-1.5's (:class:`~mech_vqa.adapters.llava.LlavaAdapter`).
What differs is the image: the processor returns ``pixel_values`` ``[1, n_views, 3, T, T]`` --
view 0 the whole image stretched to ``T x T``, views ``1..`` the ``T x T`` tiles of a canvas of the
best grid resolution ("pinpoint") into which the image was resized (aspect kept) and padded -- and
``image_sizes`` ``[1, 2]`` (original height, width). The model packs the features as view 0's
``g x g`` patches (``g = T / patch``) followed by the high-resolution grid of all tiles with the
padding rows / columns removed and one ``image_newline`` token closing every row.

The geometry is read by running the model's own ``pack_image_features`` on index features (each
patch feature replaced by ``(is_tile, row, col)``, row and column on view 0's grid or on the padded
canvas's, the newline by ``-1``), so it follows HF's packing exactly. Tokens of view 0 have ``rowcol`` on the ``g x g`` grid; tokens of view 1 (all
tiles together) on the high-resolution grid of the padded canvas; the newline tokens are not
patches and are left out of ``positions``. When the model downsamples that grid (OneVision), view 1's
``rowcol`` is on the downsampled grid and each token's box is its share of the kept canvas. All boxes,
and each view's ``view_boxes``, are in view 0's pixels, so heatmaps of either view are drawn over the
same image.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import AdapterError, ImageGeometry, register_adapter
from .llava import LlavaAdapter


@register_adapter
class LlavaNextAdapter(LlavaAdapter):
    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "LlavaNextForConditionalGeneration"

    @property
    def tile_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    def tokens_per_image(self) -> int:
        raise AdapterError("LLaVA-NeXT images give a number of tokens that depends on their size; "
                           "use image_geometry(input_ids, pixel_values, image_sizes)")

    def _tile_grid(self, image_size: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int], int]:
        """``((best_h, best_w), (tiles_down, tiles_across), n_views)`` for an original ``(h, w)``."""
        from transformers.image_processing_utils import select_best_resolution

        pinpoints = self.model.config.image_grid_pinpoints
        best_h, best_w = select_best_resolution(list(image_size), pinpoints)
        tile = self.tile_size
        down, across = best_h // tile, best_w // tile
        return (best_h, best_w), (down, across), down * across + 1

    def image_geometry(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                       image_sizes: torch.Tensor | None = None) -> ImageGeometry:
        if input_ids.dim() != 1:
            raise ValueError(f"image_geometry takes one sequence [S], got shape {tuple(input_ids.shape)}")
        if image_sizes is None:
            raise AdapterError("tiled-image geometry needs image_sizes (the processor returns it with "
                               "pixel_values); build inputs with VQAModel.prepare()")
        image_sizes = torch.as_tensor(image_sizes).reshape(-1, 2)
        if image_sizes.shape[0] != 1:
            raise AdapterError(f"one image per prompt is supported for {type(self.model).__name__}, "
                               f"got {image_sizes.shape[0]}")
        if self.has_cls_token:
            raise AdapterError("a tiled LLaVA with the 'full' feature strategy on a CLIP tower keeps CLS tokens "
                               "that HF's own packing does not expect; use vision_feature_select_strategy='default'")
        found = (input_ids == self.image_token_id).nonzero().flatten().cpu()
        if found.numel() == 0:
            raise AdapterError(
                f"the prompt has no image token (id {self.image_token_id}); put the processor's image "
                "token (e.g. '<image>') in the text, or build inputs with VQAModel.prepare()"
            )
        original = (int(image_sizes[0, 0]), int(image_sizes[0, 1]))
        (best_h, best_w), (_, across), n_views = self._tile_grid(original)
        g = self.tile_size // self.patch_size
        features = self._index_features(n_views, across, g)
        unpadded, packed = self._pack(features, image_sizes)
        if packed.shape[0] != found.numel():
            raise AdapterError(
                f"the prompt has {found.numel()} image tokens but this {original[0]} x {original[1]} image gives "
                f"{packed.shape[0]} features; let the processor expand '<image>' (pass images= with text=)"
            )
        patch = packed[:, 0] >= 0                                               # newline tokens are -1
        base = patch & (packed[:, 0] < 0.5)
        hires = patch & ~base
        frame_h, frame_w = (tuple(int(v) for v in pixel_values.shape[-2:]) if pixel_values is not None
                            else (self.tile_size, self.tile_size))
        # the high-resolution grid: the unpadded canvas patches, or (downsampled) a coarser grid over them
        kept = unpadded[:, 0] > 0.5
        top, left = unpadded[kept, 1].min(), unpadded[kept, 2].min()
        rows_kept = int(unpadded[kept, 1].max() - top) + 1
        cols_kept = int(unpadded[kept, 2].max() - left) + 1
        n_rows = int((packed[:, 0] < 0).sum())                                  # one newline closes each row
        n_cols = int(hires.sum()) // max(n_rows, 1)
        i = torch.arange(int(hires.sum())) // n_cols
        j = torch.arange(int(hires.sum())) % n_cols
        step_r, step_c = rows_kept / n_rows, cols_kept / n_cols                 # 1 unless downsampled
        cell = self.patch_size                                                  # canvas pixels per patch
        y0, x0 = (top + i * step_r) * cell, (left + j * step_c) * cell
        to_frame = self._canvas_to_frame(original, (best_h, best_w), (frame_h, frame_w))
        hires_boxes = to_frame(torch.stack([x0, y0, x0 + step_c * cell, y0 + step_r * cell], dim=1).float())
        same_grid = n_rows == rows_kept and n_cols == cols_kept
        hires_rowcol = (torch.stack([top + i, left + j], 1) if same_grid else torch.stack([i, j], 1)).long()
        base_rows, base_cols = packed[base, 1].long(), packed[base, 2].long()
        base_cell_w, base_cell_h = frame_w / g, frame_h / g
        base_boxes = torch.stack([base_cols * base_cell_w, base_rows * base_cell_h,
                                  (base_cols + 1) * base_cell_w, (base_rows + 1) * base_cell_h], dim=1).float()
        order = torch.cat([torch.nonzero(base).flatten(), torch.nonzero(hires).flatten()])
        if not torch.equal(order, torch.nonzero(patch).flatten()):
            raise AdapterError("unexpected packing: the first view's patches do not precede the tiles'")
        boxes = torch.cat([base_boxes, hires_boxes])
        boxes = torch.stack([boxes[:, 0].clamp(0, frame_w), boxes[:, 1].clamp(0, frame_h),
                             boxes[:, 2].clamp(0, frame_w), boxes[:, 3].clamp(0, frame_h)], dim=1)
        tile = torch.arange(1, n_views)
        tx, ty = (tile - 1) % across * self.tile_size, (tile - 1) // across * self.tile_size
        tile_boxes = to_frame(torch.stack([tx, ty, tx + self.tile_size, ty + self.tile_size], dim=1).float())
        view_boxes = torch.cat([torch.tensor([[0.0, 0.0, frame_w, frame_h]]), tile_boxes])
        return ImageGeometry(positions=found[patch], rowcol=torch.cat([torch.stack([base_rows, base_cols], 1),
                                                                       hires_rowcol]),
                             boxes=boxes, grid=(g, g), image_size=(frame_h, frame_w),
                             view=torch.cat([torch.zeros(int(base.sum())), torch.ones(int(hires.sum()))]).long(),
                             view_boxes=view_boxes)

    @staticmethod
    def _index_features(n_views: int, across: int, g: int) -> torch.Tensor:
        """``[n_views, g*g, 3]``: ``(is_tile, row, col)`` of every patch feature, on view 0's grid or on
        the padded canvas's (tile ``t`` sits at row ``(t-1) // across``, column ``(t-1) % across``)."""
        tile = torch.arange(n_views).repeat_interleave(g * g)
        local = torch.arange(g * g).repeat(n_views)
        is_tile = tile > 0
        row = torch.where(is_tile, (tile - 1).clamp(min=0) // across * g, 0) + local // g
        col = torch.where(is_tile, (tile - 1).clamp(min=0) % across * g, 0) + local % g
        return torch.stack([is_tile.float(), row.float(), col.float()], -1).view(n_views, g * g, 3)

    def _pack(self, features: torch.Tensor, image_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own ``pack_image_features`` on index features ``[n_views, g*g, 3]``:
        ``(every kept canvas patch, what the model really packs)``, each ``[n_tokens, 3]`` with newline
        tokens ``-1``. LLaVA-NeXT never downsamples, so both are the same packing."""
        packed, _ = self.model.pack_image_features([features], image_sizes, vision_feature_select_strategy="default",
                                                   image_newline=torch.full((3,), -1.0))
        return packed[0], packed[0]

    @staticmethod
    def _canvas_to_frame(original, best, frame):
        """Map canvas boxes ``[N, 4]`` to view 0's pixels (the processor's resize-and-pad, inverted)."""
        orig_h, orig_w = original
        best_h, best_w = best
        frame_h, frame_w = frame
        # transformers.image_processing_utils.get_patch_output_size: resize keeping the aspect ratio
        if best_w / orig_w < best_h / orig_h:
            new_w, new_h = best_w, min(math.ceil(orig_h * best_w / orig_w), best_h)
        else:
            new_h, new_w = best_h, min(math.ceil(orig_w * best_h / orig_h), best_w)
        pad_x, pad_y = (best_w - new_w) // 2, (best_h - new_h) // 2
        scale = torch.tensor([frame_w / new_w, frame_h / new_h] * 2)
        offset = torch.tensor([pad_x, pad_y] * 2, dtype=torch.float32)

        def to_frame(boxes: torch.Tensor) -> torch.Tensor:
            return (boxes - offset) * scale

        return to_frame

    def pixel_transform(self, image_processor, original_size, model_size) -> tuple[float, float, float, float]:
        # view 0 is the whole image stretched to the tile size (no crop)
        width, height = original_size
        out_h, out_w = model_size
        return (out_w / width, out_h / height, 0.0, 0.0)


@register_adapter
class LlavaOnevisionAdapter(LlavaNextAdapter):
    """LLaVA-OneVision: LLaVA-NeXT's tiles (SigLIP, no class token), and a high-resolution grid that the
    model bilinearly downsamples when it exceeds ``vision_aspect_ratio`` (``anyres_max_N``: about
    ``N`` tiles' worth of patches). A downsampled token then shows a proportionally larger box."""

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "LlavaOnevisionForConditionalGeneration"

    def _pack(self, features: torch.Tensor, image_sizes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inner = getattr(self.model, "model", self.model)  # the ForConditionalGeneration wrapper's pack is broken
        newline = torch.full((3,), -1.0)
        return tuple(inner.pack_image_features([features], image_sizes, image_newline=newline,
                                               vision_aspect_ratio=ratio)[0][0]
                     for ratio in ("anyres_max_1000000000", self.model.config.vision_aspect_ratio))
