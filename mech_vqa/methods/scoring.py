"""Black-box scoring for perturbation methods: pixels -> log-probabilities of the answer tokens.

iGOS++ (Xing et al. 2025, arXiv 2503.13891) and the insertion/deletion metric only ever ask one
question of the model: *how likely is the (teacher-forced) answer when the model sees these
pixels?* This module answers it, for any model an adapter supports, and builds the baselines the
pixels are blended with.

Scoring. For pixel values ``X`` ``[N, *pixel_shape]`` (``pixel_shape`` = the shape of one
``PreparedInput.pixel_values`` row, ``[3, H, W]`` for LLaVA-1.5) and answer tokens
``y_1..y_T`` at sequence indices ``a_1..a_T``::

    log p(y_t | X) = log_softmax(W_U h_L(X)[a_t - 1])[y_t]        -> [N, T] float32

by one teacher-forced forward of the batch (no KV cache). Only the rows ``a_t - 1`` of the last
hidden state reach the unembedding (a pre-hook on ``adapter.unembed`` slices them), and the
sequence is cut after the last of them (causal attention: later tokens cannot change it), so no
full-vocabulary logits are computed at other positions; the last layer's MLP, whose output is read
only at those rows, runs only there (:func:`~mech_vqa.runner.last_mlp_only_at`). The log-softmax
runs in float32 whatever the model dtype.

Baselines (``baseline_image``): the image as given (PIL, before preprocessing) is blurred,
blacked out or replaced by noise, *then* run through the processor's image processor exactly like
the original, as the authors do (``preprocess(GaussBlur(raw))``). The blur is a separable Gaussian
on the uint8 RGB pixels with an odd kernel of about a third of the longer side and, like the
authors' ``cv2.GaussianBlur(k, sigmaX=k-1)``, sigma ``k - 1`` by default (close to a box blur);
borders are reflected (cv2's default ``BORDER_REFLECT_101``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..hooks import HookSet
from ..inputs import PreparedInput, check_image
from ..runner import last_mlp_only_at

BASELINES = ("blur", "black", "noise")


# ----------------------------------------------------------------------------- baselines
def blur_kernel_size(height: int, width: int) -> int:
    """Odd Gaussian kernel size of about a third of the longer image side (at least 3)."""
    size = max(3, round(max(height, width) / 3))
    return size if size % 2 else size + 1


def gaussian_blur(image, kernel_size: int | None = None, sigma: float | None = None):
    """Blur a PIL RGB image with a separable Gaussian (uint8 in, uint8 out).

    ``kernel_size`` defaults to :func:`blur_kernel_size`, ``sigma`` to ``kernel_size - 1``.
    """
    from PIL import Image

    image = check_image(image)
    width, height = image.size
    kernel_size = kernel_size or blur_kernel_size(height, width)
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"blur kernel_size must be a positive odd integer, got {kernel_size}")
    sigma = float(sigma if sigma is not None else max(kernel_size - 1, 1))
    if sigma <= 0:
        raise ValueError(f"blur sigma must be > 0, got {sigma}")
    offsets = torch.arange(kernel_size, dtype=torch.float64) - kernel_size // 2
    kernel = torch.exp(-offsets ** 2 / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).float()
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None]  # [1, 3, H, W]
    half = kernel_size // 2
    # reflect (cv2's default border) needs the pad to be smaller than the side; replicate otherwise
    mode = "reflect" if half < min(height, width) else "replicate"
    pixels = F.pad(pixels, (half, half, half, half), mode=mode)
    pixels = F.conv2d(pixels, kernel.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)
    pixels = F.conv2d(pixels, kernel.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)
    out = pixels[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(out, "RGB")


def baseline_image(image, kind: str = "blur", *, kernel_size: int | None = None, sigma: float | None = None,
                   seed: int = 0):
    """The baseline PIL image: ``"blur"`` (Gaussian), ``"black"`` (zeros) or ``"noise"`` (uniform uint8)."""
    from PIL import Image

    image = check_image(image)
    if kind == "blur":
        return gaussian_blur(image, kernel_size, sigma)
    if kind == "black":
        return Image.new("RGB", image.size, (0, 0, 0))
    if kind == "noise":
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, size=(image.height, image.width, 3), dtype=np.uint8), "RGB")
    raise ValueError(f"unknown baseline {kind!r}; choose one of {BASELINES} or pass a pixel tensor")


def preprocess_image(processor, image) -> torch.Tensor:
    """``pixel_values`` of ``image`` through the processor's image processor (as ``prepare`` does)."""
    from transformers.processing_utils import ProcessorMixin

    image = check_image(image)
    own = getattr(type(processor), "_process_images", None)
    if own is not None and own is not ProcessorMixin._process_images:
        # the processor sets its image processor's options itself (Pixtral: whole tokens of patch * merge px,
        # where the image processor alone rounds to patches): its own image path, as prepare's call takes it
        pixels = processor._process_images(image, return_tensors="pt")[0]["pixel_values"]
    else:
        pixels = processor.image_processor(images=image, return_tensors="pt")["pixel_values"]
    # a processor that returns one flat list of patches (Qwen-VL) gets the row dimension prepare gives it
    return pixels.unsqueeze(0) if pixels.dim() == 2 else pixels


def baseline_pixels(processor, image, kind: str | torch.Tensor = "blur", *, like: torch.Tensor | None = None,
                    **kwargs) -> torch.Tensor:
    """Preprocessed baseline pixels ``[1, *pixel_shape]`` for ``image``.

    ``kind`` is one of :data:`BASELINES` (``kwargs`` go to :func:`baseline_image`) or a ready
    pixel tensor, which is checked against ``like`` (the original's pixel values).
    """
    if torch.is_tensor(kind):
        pixels = kind.detach()
        if like is not None and pixels.dim() == like.dim() - 1:  # one row given without its batch dim
            pixels = pixels.unsqueeze(0)
    else:
        pixels = preprocess_image(processor, baseline_image(image, kind, **kwargs))
    if like is not None and tuple(pixels.shape) != tuple(like.shape):
        raise ValueError(
            f"baseline pixels have shape {tuple(pixels.shape)} but the image's are {tuple(like.shape)}; "
            "build the baseline with the same processor (baseline_pixels(processor, image, kind))"
        )
    return pixels.float()


def input_baseline(vqa, inp: PreparedInput, kind: str | torch.Tensor = "blur", **kwargs) -> torch.Tensor:
    """Baseline pixels for a prepared input (its PIL image through ``vqa.processor``)."""
    if torch.is_tensor(kind):
        return baseline_pixels(vqa.processor, None, kind, like=inp.pixel_values)
    if inp.image is None:
        raise ValueError("this PreparedInput carries no PIL image; prepare it with VQAModel.prepare(image, ...) "
                         "or pass the baseline as a pixel tensor")
    return baseline_pixels(vqa.processor, inp.image, kind, like=inp.pixel_values, **kwargs)


# ------------------------------------------------------------------------------- scoring
class AnswerScorer:
    """``pixels [N, *pixel_shape] -> log p(y_t | pixels) [N, T]`` (float32) for chosen answer tokens.

    Differentiable with respect to the pixels (call it under ``torch.no_grad()`` when no gradient
    is wanted). The caller decides the batch size; rows are independent.

    Args:
        vqa: the :class:`~mech_vqa.model.VQAModel`.
        inp: the prepared input with its answer teacher-forced.
        answer_indices: which answer tokens to score (indices into the answer); default all.
    """

    def __init__(self, vqa, inp: PreparedInput, answer_indices: Sequence[int] | None = None):
        if inp.pixel_values.dim() == 4 and inp.pixel_values.shape[0] > 1:
            # InternVL: the image's tiles and thumbnail ride along pixel_values' batch axis, where the scorer
            # puts its perturbed copies
            raise NotImplementedError(
                f"this input's {inp.pixel_values.shape[0]} image views (tiles) ride along pixel_values' batch axis, "
                "so pixel-perturbation methods (token selection, iGOS, insertion / deletion, knock-outs, compare) "
                "cannot batch perturbed copies of it; prepare the image as one tile and keep it so while the method runs (InternVL: "
                "vqa.processor.image_processor.max_patches = 1) or use the token-level methods (mechanistic, "
                "logit lens, attention, relevancy, causal, ablation), which handle every tile")
        n_answer = int(inp.answer_positions.numel())
        if n_answer == 0:
            raise ValueError("this input has no answer tokens to score; prepare it with an answer "
                             "(VQAModel.prepare(image, question, answer)) or let it generate one")
        indices = list(range(n_answer)) if answer_indices is None else [int(i) for i in answer_indices]
        for i in indices:
            if not 0 <= i < n_answer:
                raise IndexError(f"answer token {i} is out of range: the answer has {n_answer} tokens")
        self.vqa, self.inp = vqa, inp
        self.answer_indices = indices
        sequence_index = inp.answer_positions[indices] if indices else torch.zeros(0, dtype=torch.long)
        self.token_ids = inp.input_ids[0, sequence_index].clone()             # [T]
        self.predicting = (sequence_index - 1).clone()                         # [T]
        length = int(self.predicting.max()) + 1 if indices else 1
        self.input_ids = inp.input_ids[:, :length]                            # causal: nothing later matters
        self.device = vqa.device
        self.dtype = vqa.adapter.vision_dtype()

    @property
    def n_tokens(self) -> int:
        return len(self.answer_indices)

    def _inputs(self, pixels: torch.Tensor) -> dict:
        n = pixels.shape[0]
        ids = self.input_ids.to(self.device).expand(n, -1)
        length = ids.shape[1]
        # per-token inputs (Gemma-3's token_type_ids) are cut with the ids
        extra = {k: (v[..., :length] if torch.is_tensor(v) and v.dim() == 2 and v.shape[-1] == self.inp.seq_len else v)
                 for k, v in self.inp.extra.items()}
        # contiguous: Idefics3 views its pixel_attention_mask, which an expanded (stride-0) tensor refuses
        extra = {k: (v.to(self.device).expand(n, *v.shape[1:]).contiguous() if torch.is_tensor(v) else v)
                 for k, v in extra.items()}
        return self.vqa.adapter.model_inputs({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                              "pixel_values": pixels.to(self.device, self.dtype), **extra})

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.n_tokens == 0:
            return pixels.new_zeros((pixels.shape[0], 0), dtype=torch.float32)
        rows = self.predicting.to(self.device)
        backend = getattr(self.vqa, "backend", None)
        if getattr(backend, "name", "hooks") != "hooks":
            return self._through_backend(backend, pixels, rows)

        def keep_answer_rows(module, args, kwargs):
            # the unembedding sees only the predicting rows: [N, S, d] -> [N, T, d]
            hidden = args[0] if args else kwargs.pop("input")
            return (hidden.index_select(1, rows),), kwargs

        hooks = HookSet()
        try:
            last_mlp_only_at(hooks, self.vqa.adapter, rows)
            hooks.pre(self.vqa.adapter.unembed, keep_answer_rows)
            logits = self.vqa.model(**self._inputs(pixels), use_cache=False).logits   # [N, T, V]
        finally:
            hooks.remove()
        log_probs = logits.float().log_softmax(-1)
        index = self.token_ids.to(log_probs.device).view(1, -1, 1).expand(pixels.shape[0], -1, 1)
        return log_probs.gather(-1, index)[..., 0]

    def _through_backend(self, backend, pixels: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The same scores through ``vqa.forward`` (any backend; active ``vqa.trace`` interventions apply):
        logits at the predicting rows only. Gradients reach ``pixels`` when the forward runs in this
        process; a remote trace sends back saved values, not a graph."""
        if getattr(backend, "remote", False) and torch.is_grad_enabled() and pixels.requires_grad:
            from ..backends import BackendNotSupported

            raise BackendNotSupported(
                "AnswerScorer with gradients is not supported through a remote nnsight trace: the answer scores "
                "come back as saved values without an autograd graph to the pixels; run it in process "
                "(remote=False) or on the hooks backend (igos differentiates inside an nnsight session instead)")
        logits = self.vqa.forward(self._inputs(pixels), logits_to_keep=rows).logits     # [N, T, V]
        log_probs = logits.float().log_softmax(-1)
        index = self.token_ids.to(log_probs.device).view(1, -1, 1).expand(pixels.shape[0], -1, 1)
        return log_probs.gather(-1, index)[..., 0]

    def reference(self, pixels: torch.Tensor) -> torch.Tensor:
        """The same numbers computed the reference implementation's way, for benchmarks and tests only.

        One forward per row at batch size 1 over the *whole* teacher-forced sequence, with
        full-vocabulary logits at every position, softmax over all of them, then the answer rows
        picked (what the authors' ``pred_probs`` does, minus its fp16 softmax).
        """
        rows = []
        for row in pixels.split(1):
            n = self.inp.input_ids.shape[1]
            ids = self.inp.input_ids.to(self.device)
            inputs = {"input_ids": ids, "attention_mask": torch.ones(1, n, dtype=torch.long, device=self.device),
                      "pixel_values": row.to(self.device, self.dtype),
                      **{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in self.inp.extra.items()}}
            out = self.vqa.model(**self.vqa.adapter.model_inputs(inputs), use_cache=False)
            log_probs = out.logits.float().log_softmax(-1)[0]                   # [S, V]
            rows.append(log_probs[self.predicting.to(log_probs.device), self.token_ids.to(log_probs.device)])
        return torch.stack(rows)
