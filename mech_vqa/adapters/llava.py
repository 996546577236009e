"""Adapter for HF ``LlavaForConditionalGeneration`` (LLaVA-1.5 and its tiny/organism relatives).

transformers 5.x layout::

    model.model.language_model.layers[i].{input_layernorm, self_attn.{q,k,v,o}_proj,
                                          post_attention_layernorm, mlp.{gate,up,down}_proj}
    model.model.language_model.norm, model.lm_head,
    model.model.vision_tower, model.model.multi_modal_projector

The 4.4x layout (``model.language_model.model.layers``) is recognised too. Image tokens: the
processor expands ``<image>`` into one token per vision patch (the CLS token is dropped by the
``default`` feature strategy), in row-major order over a square ``image_size / patch_size`` grid.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from .base import AdapterError, ImageGeometry, ModelAdapter, register_adapter

_LAYOUTS = {
    # name: (layers, final norm, embed, vision tower, projector)
    "v5": ("model.language_model.layers", "model.language_model.norm", "model.language_model.embed_tokens",
           "model.vision_tower", "model.multi_modal_projector"),
    "v4": ("language_model.model.layers", "language_model.model.norm", "language_model.model.embed_tokens",
           "vision_tower", "multi_modal_projector"),
}


def _has(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


@register_adapter
class LlavaAdapter(ModelAdapter):
    unembed_path = "lm_head"

    def __init__(self, model: nn.Module):
        super().__init__(model)
        for layout in _LAYOUTS.values():
            if _has(model, layout[0]):
                (self.layers_path, self.final_norm_path, self.embed_path,
                 self.vision_tower_path, self.projector_path) = layout
                break
        else:
            raise AdapterError(
                f"{type(model).__name__} has no decoder layers at any known LLaVA path "
                f"({', '.join(v[0] for v in _LAYOUTS.values())})"
            )
        self._check_layer_modules()

    def _check_layer_modules(self) -> None:
        """Every method reads separate q/k/v/o projections and the MLP's down projection: say so at
        load time, not as an AttributeError deep inside a method."""
        layer = self.layers[0]
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        missing = [f"self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")
                   if not hasattr(attn, name)]
        missing += [] if hasattr(mlp, "down_proj") else ["mlp.down_proj"]
        text = type(self.model.config.get_text_config()).__name__
        extra_norms = [name for name, _ in layer.named_children()
                       if "norm" in name and name not in ("input_layernorm", "post_attention_layernorm")]
        capped = [key for key in ("attn_logit_softcapping", "final_logit_softcapping")
                  if getattr(self.model.config.get_text_config(), key, None)]
        if extra_norms or capped:
            # Gemma-2/3 style: block outputs are normalised before they reach the residual stream and
            # scores are soft-capped, so the decompositions every method relies on would be silently wrong
            raise AdapterError(
                f"the text model ({text}) has {', '.join(extra_norms + capped)}: a layout whose attention / MLP "
                "outputs are normalised before the residual add, or whose scores are soft-capped; mech_vqa's "
                "decompositions assume a pre-norm Llama-like layer (Llama, Mistral, Qwen2, Gemma)"
            )
        if missing:
            raise AdapterError(
                f"the text model ({text}) has no {', '.join(missing)} in its decoder layers (fused projections?); "
                "mech_vqa supports Llama-like text models with separate q/k/v/o projections (Llama, Mistral, "
                "Qwen2, Gemma). A ModelAdapter subclass registered with register_adapter can map another layout"
            )

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "LlavaForConditionalGeneration"

    # ------------------------------------------------------------------------ attention
    def rotate_qk(self, layer, q, k, position_embeddings):
        # Use the model's own rotary function so the rotation can never drift from HF's.
        module = sys.modules[type(self.attn(layer)).__module__]
        cos, sin = position_embeddings
        return module.apply_rotary_pos_emb(q, k, cos, sin)

    def rotary_function(self, layer):
        return sys.modules[type(self.attn(layer)).__module__].apply_rotary_pos_emb

    # ------------------------------------------------------------------------ geometry
    @property
    def image_token_id(self) -> int:
        config = self.model.config
        token = getattr(config, "image_token_id", None)
        return int(token if token is not None else config.image_token_index)

    @property
    def patch_grid(self) -> tuple[int, int]:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return side, side

    @property
    def patch_size(self) -> int:
        return self.model.config.vision_config.patch_size

    @property
    def has_cls_token(self) -> bool:
        """Whether the image features keep a class token: the ``full`` strategy on a tower that has
        one (CLIP: ``num_positions = num_patches + 1``; SigLIP has none)."""
        if self.model.config.vision_feature_select_strategy != "full":
            return False
        for module in self.vision_tower.modules():
            if hasattr(module, "num_positions") and hasattr(module, "num_patches"):
                return module.num_positions > module.num_patches
        return any(hasattr(module, "class_embedding") for module in self.vision_tower.modules())

    def tokens_per_image(self) -> int:
        rows, cols = self.patch_grid
        return rows * cols + int(self.has_cls_token)

    def image_geometry(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                       image_sizes: torch.Tensor | None = None) -> ImageGeometry:
        if input_ids.dim() != 1:
            raise ValueError(f"image_geometry takes one sequence [S], got shape {tuple(input_ids.shape)}")
        found = (input_ids == self.image_token_id).nonzero().flatten().cpu()
        per_image = self.tokens_per_image()
        if found.numel() == 0:
            raise AdapterError(
                f"the prompt has no image token (id {self.image_token_id}); put the processor's image "
                "token (e.g. '<image>') in the text, or build inputs with VQAModel.prepare()"
            )
        if found.numel() % per_image:
            raise AdapterError(
                f"the prompt has {found.numel()} image tokens but each image gives {per_image} features; "
                "let the processor expand '<image>' (pass images= together with text=) instead of "
                "writing image tokens by hand"
            )
        rows, cols = self.patch_grid
        n_views = found.numel() // per_image
        views = found.view(n_views, per_image)
        if self.has_cls_token:
            views = views[:, 1:]
        positions = views.reshape(-1)
        index = torch.arange(rows * cols)
        rowcol = torch.stack([index // cols, index % cols], dim=1).repeat(n_views, 1)
        height, width = (pixel_values.shape[-2:] if pixel_values is not None
                         else (rows * self.patch_size, cols * self.patch_size))
        cell_h, cell_w = height / rows, width / cols
        boxes = torch.stack([rowcol[:, 1] * cell_w, rowcol[:, 0] * cell_h,
                             (rowcol[:, 1] + 1) * cell_w, (rowcol[:, 0] + 1) * cell_h], dim=1).float()
        view = torch.arange(n_views).repeat_interleave(rows * cols)
        return ImageGeometry(positions=positions, rowcol=rowcol, boxes=boxes, grid=(rows, cols),
                             image_size=(int(height), int(width)), view=view)
