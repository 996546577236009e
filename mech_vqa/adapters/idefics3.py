"""Adapter for HF ``Idefics3ForConditionalGeneration`` and ``SmolVLMForConditionalGeneration``.

transformers 5.x layout: ``model.model.text_model.{layers, norm, embed_tokens}``, ``model.model.vision_model``
(SigLIP), ``model.model.connector`` (pixel shuffle by ``scale_factor``, then an MLP), ``lm_head``; the
text model is a pre-norm Llama.

Images: the processor resizes the image to its ``size["longest_edge"]`` (aspect kept), stretches it to
multiples of the tile size ``T`` (``max_image_size``), cuts ``rows x cols`` tiles row-major and appends
the whole image squashed to ``T x T`` (the global image); an image no larger than one tile is that
tile alone. ``pixel_values`` is ``[1, n_views, 3, T, T]``. In the prompt every tile is
``<fake_token_around_image><row_i_col_j>`` followed by its ``<image>`` tokens (a newline after each
row), then ``<fake_token_around_image><global-img>``, the global image's tokens and
``<fake_token_around_image>``. Each view's ``g x g`` patches go through the connector's own
``pixel_shuffle``, which folds ``s x s`` blocks into one token: ``(g / s)^2`` tokens per view.

The geometry runs that ``pixel_shuffle`` on index features, so each token's patches (and box) are
what the model merged; the tile grid is read from the ``<row_i_col_j>`` markers in the prompt (their
ids come from the processor, :meth:`bind_processor`). The frame is the global image: view 0 is its
tokens, view 1 every tile's on the ``rows * g/s x cols * g/s`` grid of the stretched canvas; boxes and
``view_boxes`` are in the frame's pixels (the canvas is the whole image stretched, so tile ``(i, j)``
shows ``[j T/cols, i T/rows, (j+1) T/cols, (i+1) T/rows]``). The markers (row / column, global and
boundary tokens) are listed in ``geometry.markers`` and never painted.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterError, ImageGeometry, PixelShuffleTiles, register_adapter
from .llava import LlavaAdapter


@register_adapter
class Idefics3Adapter(PixelShuffleTiles, LlavaAdapter):
    layers_path = "model.text_model.layers"
    final_norm_path = "model.text_model.norm"
    embed_path = "model.text_model.embed_tokens"
    vision_tower_path = "model.vision_model"
    projector_path = "model.connector"

    def __init__(self, model: nn.Module):
        self.model = model
        self.marker_ids: dict[str, object] | None = None
        self._check_layer_modules()

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return type(model).__name__ in ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")

    def bind_processor(self, processor) -> None:
        tokenizer = processor.tokenizer
        markers = {(i, j): tokenizer.convert_tokens_to_ids(f"<row_{i}_col_{j}>") for i in range(1, 7) for j in range(1, 7)}
        unknown = getattr(tokenizer, "unk_token_id", None)
        self.marker_ids = {
            "tiles": {token: rc for rc, token in markers.items() if token is not None and token != unknown},
            "other": [t for t in tokenizer.convert_tokens_to_ids(["<fake_token_around_image>", "<global-img>"])
                      if t is not None and t != unknown],
        }

    @property
    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    @property
    def tile_size(self) -> int:
        return int(self.model.config.vision_config.image_size)

    @property
    def shuffle(self) -> int:
        return int(self.model.config.scale_factor)

    @property
    def vision_patch(self) -> int:
        return int(self.model.config.vision_config.patch_size)

    def _shuffled_patches(self) -> torch.Tensor:
        """``[tokens per view, s^2, 2]``: ``(row, col)`` of the patches the connector's own
        ``pixel_shuffle`` folds into each token, in its token order."""
        g = self.tile_size // self.vision_patch
        index = torch.stack(torch.meshgrid(torch.arange(g), torch.arange(g), indexing="ij"), -1).float()
        folded = self.projector.pixel_shuffle(index.view(1, g * g, 2), self.shuffle)
        return folded.reshape(-1, self.shuffle ** 2, 2).long()

    def image_geometry(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                       image_sizes: torch.Tensor | None = None) -> ImageGeometry:
        if input_ids.dim() != 1:
            raise ValueError(f"image_geometry takes one sequence [S], got shape {tuple(input_ids.shape)}")
        ids = input_ids.cpu()
        found = (ids == self.image_token_id).nonzero().flatten()
        if found.numel() == 0:
            raise AdapterError(f"the prompt has no image token (id {self.image_token_id}); put '<image>' in the text, "
                               "or build inputs with VQAModel.prepare()")
        per_view = self.tokens_per_image()
        if found.numel() % per_view:
            raise AdapterError(f"the prompt has {found.numel()} image tokens, not a multiple of the {per_view} each "
                               "tile gives; let the processor expand '<image>'")
        n_views = found.numel() // per_view
        if pixel_values is not None and pixel_values.dim() == 5 and pixel_values.shape[1] != n_views:
            raise AdapterError(f"{pixel_values.shape[1]} views of pixel values for {n_views} views of image tokens; "
                               "one image per prompt, expanded by the processor")
        if n_views > 1 and self.marker_ids is None:
            raise AdapterError("the tile grid is read from the <row_i_col_j> markers, whose ids only the tokenizer "
                               "knows: build the model with VQAModel(model, processor) or call "
                               "adapter.bind_processor(processor)")
        tiles = []
        if n_views > 1:
            tile_ids = self.marker_ids["tiles"]
            marker_at = [int(p) for p in torch.isin(ids, torch.tensor(list(tile_ids))).nonzero().flatten()]
            tiles = [tile_ids[int(ids[p])] for p in marker_at]
            if len(tiles) != n_views - 1:
                raise AdapterError(f"{n_views - 1} tiles of image tokens but {len(tiles)} <row_i_col_j> markers")
        rows = max((r for r, _ in tiles), default=1)
        cols = max((c for _, c in tiles), default=1)
        marker_ids = [] if self.marker_ids is None else list(self.marker_ids["tiles"]) + self.marker_ids["other"]
        start, end = int(found.min()), int(found.max())
        span = torch.arange(max(start - 2, 0), min(end + 2, ids.numel() - 1) + 1)
        markers = span[torch.isin(ids[span], torch.tensor(marker_ids, dtype=ids.dtype))] if marker_ids else None
        return ImageGeometry(positions=found, grid=self.patch_grid, image_size=(self.tile_size, self.tile_size),
                             markers=markers, **self._tiled_layout([(r - 1, c - 1) for r, c in tiles], rows, cols))

    def pixel_transform(self, image_processor, original_size, model_size) -> tuple[float, float, float, float]:
        width, height = original_size  # the frame is the whole image squashed to one tile
        out_h, out_w = model_size
        return (out_w / width, out_h / height, 0.0, 0.0)
