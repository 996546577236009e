"""Adapter for HF ``Mistral3ForConditionalGeneration`` (Mistral-Small-3.1 / 3.2 with images: a Pixtral
vision tower, a patch merger, a Mistral text model).

transformers 5.x layout: LLaVA's paths (``model.model.language_model.layers``, ``.norm``, ``.embed_tokens``,
``model.model.vision_tower``, ``model.model.multi_modal_projector``, ``lm_head``); the text model is a
pre-norm Mistral, so module access, rotation and decompositions are LLaVA's.

Images (``PixtralProcessor``): the image is resized to fit ``longest_edge`` (aspect kept, sides floored),
then stretched up to whole tokens of ``t = patch_size * spatial_merge_size`` px (28 px at 14 px patches
merged 2 x 2): ``pixel_values`` is that ``H x W`` image, ``image_sizes`` ``[[H, W]]``. The prompt holds
``H/t`` rows of ``W/t`` ``[IMG]`` tokens, each row closed by ``[IMG_BREAK]``, the last by ``[IMG_END]``.
The Pixtral tower cuts ``patch_size`` patches (2D RoPE on their ``(row, col)``, no class token, one block
of attention per image); the projector RMS-normalises them and its ``Mistral3PatchMerger`` unfolds every
``m x m`` block of the patch grid into one vector (a learned linear layer merges it), raster order of the
merged grid.

The geometry runs that merger's own ``forward`` on index features (each patch replaced by its ``(row,
col)``, the merging layer left out), so every token's patches, and its box, are what the model merged.
The image tokens must sit as the processor puts them (rows of ``W/t`` tokens, one marker after each);
the markers' positions are ``geometry.markers``, checked against the ``[IMG_BREAK]`` / ``[IMG_END]`` ids
when the processor is bound, and never painted. Boxes are in the pixels of the resized image (the
frame); ``pixel_transform`` is the processor's stretch, so masks for iGOS / insertion / deletion are laid
over ``pixel_values`` as they are. Vision-stage relevancy is refused where the merger folds several
patches into a token (``patches_per_image_token``: every published checkpoint merges 2 x 2), with one
error naming that; the LLM stage is exact.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from .base import AdapterError, ImageGeometry, MergedPatchGrid, register_adapter
from .llava import LlavaAdapter


@register_adapter
class Mistral3Adapter(MergedPatchGrid, LlavaAdapter):
    def __init__(self, model: nn.Module):
        super().__init__(model)
        self.marker_ids: dict[str, int] | None = None

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "Mistral3ForConditionalGeneration"

    def bind_processor(self, processor) -> None:
        ids = {"break": getattr(processor, "image_break_token_id", None),
               "end": getattr(processor, "image_end_token_id", None)}
        self.marker_ids = {k: int(v) for k, v in ids.items() if v is not None} or None

    # ------------------------------------------------------------------------ geometry
    @property
    def merge_size(self) -> int:
        return int(self.model.config.spatial_merge_size)

    @property
    def patch_size(self) -> int:
        """Pixels per side of one vision patch (the Pixtral tower's)."""
        size = self.model.config.vision_config.patch_size
        return int(size[0] if isinstance(size, (list, tuple)) else size)

    def tokens_per_image(self) -> int:
        raise AdapterError("Mistral-3 images give a number of image tokens that depends on their size; use "
                           "image_geometry(input_ids, pixel_values, image_sizes)")

    def vision_rows(self, value: torch.Tensor) -> torch.Tensor:
        # get_image_features squeezes the tower's batch axis before the projector: put it back ([1, n, d])
        return value.unsqueeze(0) if value.dim() == 2 else value

    def _merged_patches(self, rows: int, cols: int) -> torch.Tensor:
        """``[rows * cols, m^2, 2]``: ``(row, col)`` of the vision patches the projector's own
        ``Mistral3PatchMerger.forward`` folds into each token, in its token order (merging layer left out)."""
        merger = self.projector.patch_merger
        m, patch = int(merger.spatial_merge_size), int(merger.patch_size)
        h, w = rows * m, cols * m
        index = torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij"), -1).float()
        bare = types.SimpleNamespace(patch_size=patch, spatial_merge_size=m, merging_layer=nn.Identity())
        folded = type(merger).forward(bare, index.view(h * w, 2), [(h * patch, w * patch)])    # [n, 2 * m^2]
        return folded.view(-1, 2, m * m).transpose(1, 2).long()       # unfold keeps channels outermost

    def image_geometry(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                       image_sizes: torch.Tensor | None = None) -> ImageGeometry:
        """Geometry of one sequence's image tokens. ``image_sizes``: the processor's ``[[H, W]]`` (pixels
        of the resized image); without it, ``pixel_values``' own size (one unpadded image)."""
        if input_ids.dim() != 1:
            raise ValueError(f"image_geometry takes one sequence [S], got shape {tuple(input_ids.shape)}")
        ids = input_ids.cpu()
        if image_sizes is None:
            if pixel_values is None:
                raise AdapterError("Mistral-3 geometry needs image_sizes (the processor returns it with pixel_values); "
                                   "build inputs with VQAModel.prepare()")
            image_sizes = torch.tensor([list(pixel_values.shape[-2:])])
        sizes = torch.as_tensor(image_sizes).reshape(-1, 2).cpu()
        if sizes.shape[0] != 1:
            raise AdapterError(f"one image per prompt is supported for {type(self.model).__name__}, got "
                               f"{sizes.shape[0]} (image_sizes {sizes.tolist()})")
        height, width = (int(v) for v in sizes[0])
        side = self.token_size
        if height % side or width % side or min(height, width) < side:
            raise AdapterError(f"image_sizes {[height, width]} is not a whole number of {side} px image tokens "
                               f"({self.patch_size} px patches merged {self.merge_size} x {self.merge_size}); let "
                               "the processor resize the image")
        if pixel_values is not None and (pixel_values.shape[-2] < height or pixel_values.shape[-1] < width):
            raise AdapterError(f"pixel_values are {tuple(pixel_values.shape[-2:])} px but image_sizes says "
                               f"{[height, width]}; pass the processor's pixel_values and image_sizes together")
        rows, cols = height // side, width // side
        found = (ids == self.image_token_id).nonzero().flatten()
        if found.numel() == 0:
            raise AdapterError(f"the prompt has no image token (id {self.image_token_id}); put the processor's image "
                               "token ('[IMG]') in the text, or build inputs with VQAModel.prepare()")
        if found.numel() != rows * cols:
            raise AdapterError(f"the prompt has {found.numel()} image tokens but this {width} x {height} px image "
                               f"gives {rows} x {cols} = {rows * cols}; let the processor expand '[IMG]' (pass images= "
                               "together with text=) instead of writing image tokens by hand")
        # rows of `cols` tokens, each followed by one marker ([IMG_BREAK], the last [IMG_END])
        start = int(found[0])
        row_starts = start + torch.arange(rows) * (cols + 1)
        expected = (row_starts[:, None] + torch.arange(cols)[None, :]).flatten()
        markers = row_starts + cols
        if not torch.equal(found, expected) or int(markers[-1]) >= ids.numel():
            raise AdapterError(f"the image tokens are not laid out as the processor lays them ({rows} rows of {cols} "
                               "'[IMG]', each closed by '[IMG_BREAK]', the last by '[IMG_END]'); let the processor "
                               "expand '[IMG]'")
        if self.marker_ids is not None:
            want = torch.full((rows,), self.marker_ids.get("break", -1))
            want[-1] = self.marker_ids.get("end", -1)
            known = want >= 0
            if not torch.equal(ids[markers][known], want[known]):
                raise AdapterError(f"the tokens closing the image rows are {ids[markers].tolist()}, not [IMG_BREAK] "
                                   f"({self.marker_ids.get('break')}) and a final [IMG_END] "
                                   f"({self.marker_ids.get('end')}); let the processor expand '[IMG]'")
        patches = self._merged_patches(rows, cols)                               # [n, m^2, 2] (row, col)
        low, high = patches.amin(1), patches.amax(1)
        if not bool(((high - low + 1) == self.merge_size).all()):
            raise AdapterError("the patch merger does not fold square blocks of patches into one token")
        rowcol = low // self.merge_size
        if not torch.equal(rowcol[:, 0] * cols + rowcol[:, 1], torch.arange(rows * cols)):
            raise AdapterError("the patch merger's tokens are not in raster order of the merged grid, as the "
                               "prompt's rows are")
        patch = self.patch_size
        boxes = torch.cat([low.flip(1) * patch, (high.flip(1) + 1) * patch], 1).float()        # x0, y0, x1, y1
        return ImageGeometry(positions=found, rowcol=rowcol, boxes=boxes, grid=(rows, cols),
                             image_size=(height, width), view=torch.zeros(rows * cols, dtype=torch.long),
                             markers=markers)

    def pixel_transform(self, image_processor, original_size, model_size) -> tuple[float, float, float, float]:
        # the processor's resize (fit longest_edge, then up to whole tokens) is a stretch: no crop, no padding
        width, height = original_size
        out_h, out_w = model_size
        return (out_w / width, out_h / height, 0.0, 0.0)
