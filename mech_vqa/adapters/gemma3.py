"""Adapter for HF ``Gemma3ForConditionalGeneration`` (Gemma-3 4B / 12B / 27B with images).

transformers 5.x layout: LLaVA's paths (``model.model.language_model.layers``, ``.norm``,
``.embed_tokens``, ``model.model.vision_tower``, ``model.model.multi_modal_projector``, ``lm_head``).
What differs, and how each is read exactly:

* **Sandwich norms.** A decoder layer adds ``post_attention_layernorm(attn(input_layernorm(x)))``
  and then ``post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))``; every norm scales by
  ``1 + weight``. ``attn_out`` / ``mlp_out`` are the post-norms' outputs (what enters the residual
  stream), ``resid_mid`` the input of ``pre_feedforward_layernorm``. With a post-norm's scale frozen
  at the forward's value (as the frozen-norm scorer already freezes the final norm's), the block's
  output is linear in the raw ``o_proj`` / ``down_proj`` output, so head ``j`` adds
  ``(z_j @ W_O[j]) * s * (1 + w)`` and neuron ``k`` adds ``c_k W_down[:, k] * s * (1 + w)``, and
  these terms sum to the block output exactly (:meth:`ModelAdapter.frozen_output_norm`).
* **QK-norm.** Queries and keys are RMS-normalised per head before the rotation: captures of
  ``q`` / ``k`` apply the layer's own ``q_norm`` / ``k_norm`` (:meth:`qk_norm`).
* **Attention.** ``scaling = query_pre_attn_scalar ** -0.5``; sliding-window layers interleaved
  with global ones (``config.layer_types``), each with its own rotary base; the tokens of one image
  attend to each other bidirectionally when the processor's ``token_type_ids`` reach the forward
  (``VQAModel.prepare`` passes them): HF's mask is ``AND(window, OR(causal, same image))``,
  rebuilt by :func:`~mech_vqa.capture.attention_rows` from :meth:`attention_blocks`.
* **Soft-capping.** The config may name ``final_logit_softcapping`` / ``attn_logit_softcapping``,
  but transformers 5.24's ``Gemma3ForConditionalGeneration`` applies neither (its ``lm_head`` output
  is returned as is, and its attention never passes ``softcap``): the scorer and ``attention_rows``
  follow the forward, and a test checks that against the model's own log-probabilities.
* **Embeddings** are scaled by ``sqrt(d_model)`` inside ``embed_tokens`` (image features are not),
  so ``resid_pre`` of layer 0 is what the model adds to.
* **Geometry.** The SigLIP tower sees one ``image_size`` square (896 px: the processor stretches
  the image, no crop); the projector average-pools its ``p x p`` patch grid to
  ``mm_tokens_per_image`` tokens (``16 x 16`` = 256 at every published size), each the mean of a
  ``k x k`` block of patches (``k = p / 16``, 56 px). The prompt holds them, row-major, between
  ``<start_of_image>`` and ``<end_of_image>``; those two markers are not patches and are never
  painted. Pan-and-scan crops (off by default) are refused.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterError, ImageGeometry, register_adapter
from .llava import LlavaAdapter


@register_adapter
class Gemma3Adapter(LlavaAdapter):
    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return type(model).__name__ == "Gemma3ForConditionalGeneration"

    def _check_layer_modules(self) -> None:
        layer = self.layers[0]
        text = self.model.config.get_text_config()
        missing = [f"self_attn.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
                   if not hasattr(layer.self_attn, name)]
        missing += [name for name in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                                      "post_feedforward_layernorm") if not hasattr(layer, name)]
        missing += [] if hasattr(layer.mlp, "down_proj") else ["mlp.down_proj"]
        if missing:
            raise AdapterError(f"this Gemma-3 text model ({type(text).__name__}) has no {', '.join(missing)}: "
                               "not the transformers 5.x Gemma-3 layer the adapter reads")
        if getattr(text, "use_bidirectional_attention", False):
            raise AdapterError("the text model attends bidirectionally everywhere (use_bidirectional_attention, an "
                               "embedding checkpoint): mech_vqa's attributions explain causal next-token prediction")

    # ---------------------------------------------------------------- block outputs
    def attn_out_module(self, layer: int) -> nn.Module:
        return self.layer(layer).post_attention_layernorm

    def mlp_out_module(self, layer: int) -> nn.Module:
        return self.layer(layer).post_feedforward_layernorm

    def resid_mid_module(self, layer: int) -> nn.Module:
        return self.layer(layer).pre_feedforward_layernorm

    def output_norm(self, layer: int, block: str) -> nn.Module:
        decoder = self.layer(layer)
        if block == "attn":
            return decoder.post_attention_layernorm
        if block == "mlp":
            return decoder.post_feedforward_layernorm
        raise ValueError(f"block must be 'attn' or 'mlp', got {block!r}")

    def qk_norm(self, layer: int, which: str, x: torch.Tensor) -> torch.Tensor:
        attn = self.attn(layer)
        norm = attn.q_norm if which == "q" else attn.k_norm
        return norm(x.unflatten(-1, (-1, self.head_dim))).flatten(-2)

    # --------------------------------------------------------------- attention mask
    def attention_blocks(self, input_ids: torch.Tensor) -> torch.Tensor:
        """HF's ``get_block_sequence_ids_for_mask`` on the image-token mask: each run of image tokens
        (one image) is a block, numbered from 0 per row; text is ``-1``."""
        ids = torch.as_tensor(input_ids)
        squeeze = ids.dim() == 1
        is_image = (ids.view(-1, ids.shape[-1]) == self.image_token_id)
        previous = nn.functional.pad(is_image, (1, 0), value=False)[:, :-1]
        group = torch.cumsum((is_image & ~previous).long(), dim=1) - 1
        blocks = torch.where(is_image, group, torch.full_like(group, -1))
        return blocks[0] if squeeze else blocks

    # ------------------------------------------------------------------- geometry
    @property
    def tokens_side(self) -> int:
        per_image = int(self.model.config.mm_tokens_per_image)
        side = int(round(per_image ** 0.5))
        if side * side != per_image:
            raise AdapterError(f"mm_tokens_per_image = {per_image} is not a square number of pooled tokens")
        return side

    @property
    def patch_grid(self) -> tuple[int, int]:
        return self.tokens_side, self.tokens_side

    @property
    def patch_size(self) -> int:
        """Pixels per side of one image token (a pooled ``k x k`` block of SigLIP patches)."""
        return int(self.model.config.vision_config.image_size) // self.tokens_side

    @property
    def has_cls_token(self) -> bool:
        return False  # SigLIP has none, and the projector pools every patch

    @property
    def patches_per_image_token(self) -> int:
        vision = self.model.config.vision_config
        return (vision.image_size // vision.patch_size // self.tokens_side) ** 2

    def tokens_per_image(self) -> int:
        return self.tokens_side ** 2

    def image_geometry(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                       image_sizes: torch.Tensor | None = None) -> ImageGeometry:
        if input_ids.dim() == 1 and pixel_values is not None and pixel_values.dim() == 4 and pixel_values.shape[0] > 1:
            raise AdapterError(f"the prompt carries {pixel_values.shape[0]} images (pan-and-scan crops?); mech_vqa "
                               "explains one image per prompt: prepare with the processor's do_pan_and_scan=False")
        return super().image_geometry(input_ids, pixel_values, image_sizes)
