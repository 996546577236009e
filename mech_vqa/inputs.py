"""Input preparation: (image, question, answer?) -> model inputs with every position labelled.

The prompt is built in the chat format the model expects: the processor's chat template when it
has one, else LLaVA-1.5's ``USER: <image>\\n{question} ASSISTANT:``. A given answer is appended and
teacher-forced, so any answer token can be a target. Positions are reported so that no method has
to search for them: image tokens (with their patch geometry), question tokens, answer tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .adapters import ImageGeometry, ModelAdapter

LLAVA_15_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"


@dataclass(frozen=True)
class Target:
    """A token to explain: ``token_id`` as predicted by the logits at sequence ``position``.

    For an answer token at sequence index ``a`` the predicting position is ``a - 1``.
    """

    token_id: int
    position: int
    token: str = ""

    def to_dict(self) -> dict:
        return {"token_id": self.token_id, "position": self.position, "token": self.token}


@dataclass
class PreparedInput:
    """Model inputs for one (image, question, answer) with positions labelled.

    ``input_ids``/``attention_mask`` are ``[1, S]``, ``pixel_values`` ``[1, 3, H, W]`` (LLaVA-NeXT:
    ``[1, n_views, 3, H, W]``; Qwen-VL: the processor's flattened patches ``[1, n_patches, C T P P]``).
    ``answer_positions`` are the sequence indices of the answer tokens (teacher-forced);
    ``prompt_length`` is the index of the first answer token.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    str_tokens: list[str]
    prompt: str
    question: str
    answer: str | None
    prompt_length: int
    image_positions: torch.Tensor
    question_positions: torch.Tensor
    answer_positions: torch.Tensor
    geometry: ImageGeometry
    image: object = None  # the PIL image as given
    image_mean: tuple = (0.5, 0.5, 0.5)
    image_std: tuple = (0.5, 0.5, 0.5)
    pixel_transform: tuple = (1.0, 1.0, 0.0, 0.0)  # original pixels -> model pixels: (sx, sy, dx, dy)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        check_pixels(self.pixel_values)

    def positions_in_box(self, box) -> list[int]:
        """Image-token positions whose patch centre lies in ``box`` (model pixels, x1/y1 exclusive)."""
        boxes = self.geometry.boxes
        cx, cy = (boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2
        inside = (cx >= box[0]) & (cx < box[2]) & (cy >= box[1]) & (cy < box[3])
        return self.geometry.positions[inside].tolist()

    def box_to_model(self, box) -> list[float]:
        """Map a box ``(x0, y0, x1, y1)`` in the original image to the preprocessed image, clipped."""
        sx, sy, dx, dy = self.pixel_transform
        height, width = self.geometry.image_size
        x0, y0, x1, y1 = (float(v) for v in box)
        mapped = [x0 * sx - dx, y0 * sy - dy, x1 * sx - dx, y1 * sy - dy]
        return [min(max(mapped[0], 0.0), width), min(max(mapped[1], 0.0), height),
                min(max(mapped[2], 0.0), width), min(max(mapped[3], 0.0), height)]

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def model_inputs(self, device=None, dtype=None) -> dict:
        """The keyword arguments for the HF forward."""
        pixel = self._checked_pixels()
        if dtype is not None and pixel.dtype != dtype:
            pixel = pixel.to(dtype)
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "pixel_values": pixel, **self.extra}
        if device is None:
            return out
        device = torch.device(device)
        # (a move to the device a tensor is on is a no-op that still costs a dispatch per tensor and call)
        return {k: v.to(device) if torch.is_tensor(v) and v.device != device else v for k, v in out.items()}

    def _checked_pixels(self) -> torch.Tensor:
        """``pixel_values``, checked (:func:`check_pixels`) once per tensor and version: again after an
        in-place edit or a new tensor, not on every forward of the same one."""
        pixel = self.pixel_values
        version = None if not torch.is_tensor(pixel) or pixel.is_inference() else pixel._version
        checked = self.__dict__.get("_pixels_checked")
        if version is None or checked is None or checked[0] is not pixel or checked[1] != version:
            check_pixels(pixel)
            if version is not None:
                self.__dict__["_pixels_checked"] = (pixel, version)
        return pixel

    def has_padding(self) -> bool:
        """Whether the attention mask masks any position (read once per mask tensor and version)."""
        mask = self.attention_mask
        version = None if mask.is_inference() else mask._version
        known = self.__dict__.get("_has_padding")
        if version is not None and known is not None and known[0] is mask and known[1] == version:
            return known[2]
        padded = not bool(mask.all())
        if version is not None:
            self.__dict__["_has_padding"] = (mask, version, padded)
        return padded

    def check_position(self, position: int) -> int:
        if not -self.seq_len <= position < self.seq_len:
            raise IndexError(f"target position {position} is outside the sequence of length {self.seq_len}")
        return position % self.seq_len

    def target(self, answer_index: int | None = None, position: int | None = None) -> Target:
        """The target for answer token ``answer_index`` (default: first answer token / next token).

        ``position`` instead names the predicting position directly; its token is the next input
        token (teacher forcing), which must exist.
        """
        if position is not None:
            position = self.check_position(position)
            if position + 1 >= self.seq_len:
                raise IndexError(
                    f"position {position} is the last one: its next token is not in the input; "
                    "give the answer so it is teacher-forced, or pass a token_id"
                )
            token_id = int(self.input_ids[0, position + 1])
            return Target(token_id, position, self.str_tokens[position + 1])
        if self.answer_positions.numel() == 0:
            raise ValueError("this input has no answer tokens; prepare it with an answer or generate one")
        answer_index = 0 if answer_index is None else answer_index
        n = self.answer_positions.numel()
        if not -n <= answer_index < n:
            raise IndexError(f"answer token {answer_index} is out of range: the answer has {n} tokens")
        seq_index = int(self.answer_positions[answer_index])
        return Target(int(self.input_ids[0, seq_index]), seq_index - 1, self.str_tokens[seq_index])

    def answer_targets(self) -> list[Target]:
        return [self.target(i) for i in range(self.answer_positions.numel())]

    def display_image(self) -> np.ndarray:
        """The preprocessed image the model saw, de-normalised to ``[H, W, 3]`` floats in [0, 1]."""
        # every result of an explanation carries it: de-normalise once per pixel tensor (and version)
        key = (id(self.pixel_values), self.pixel_values._version, self.image_mean, self.image_std)
        cached = self.__dict__.get("_display")
        if cached is not None and cached[0] == key and cached[1] is self.pixel_values:
            return cached[2].copy()
        image = self._denormalised()
        self.__dict__["_display"] = (key, self.pixel_values, image)
        return image.copy()

    def _denormalised(self) -> np.ndarray:
        pixel = self.pixel_values[0].detach().float().cpu()
        if pixel.dim() == 2 and self.geometry.patch_layout is not None:  # flattened patches (Qwen-VL)
            pixel = self.geometry.unpatchify(pixel)
        if pixel.dim() == 4:  # several views (tiles): the first is the whole image
            pixel = pixel[0]
        whole = self.geometry.view_boxes
        views = self.pixel_values[0] if self.pixel_values.dim() == 5 else self.pixel_values
        if views.dim() == 4 and whole is not None and views.shape[0] == whole.shape[0] > 1:
            # the view showing the whole frame (LLaVA-NeXT's first; InternVL's thumbnail and Idefics3's
            # global image come last)
            height, width = self.geometry.image_size
            frame = torch.tensor([0.0, 0.0, width, height])
            pixel = views[int((whole == frame).all(1).nonzero()[0])].detach().float().cpu()
        mean = torch.tensor(self.image_mean).view(3, 1, 1)
        std = torch.tensor(self.image_std).view(3, 1, 1)
        # laid out [H, W, 3] in memory too: every result copies it (a strided copy costs several times more)
        return (pixel * std + mean).clamp(0, 1).permute(1, 2, 0).contiguous().numpy()

    def info(self) -> dict:
        return {"prompt": self.prompt, "question": self.question, "answer": self.answer,
                "seq_len": self.seq_len, "geometry": self.geometry.to_dict()}


def check_pixels(pixel_values):
    """``pixel_values`` unchanged, or one clear error when they hold NaN or infinite values (the model
    would turn them into NaN scores or an internal error far from the cause)."""
    if torch.is_tensor(pixel_values) and pixel_values.is_floating_point() and not torch.isfinite(pixel_values).all():
        bad = ~torch.isfinite(pixel_values)
        if bad.any():
            raise ValueError(f"pixel_values hold {int(bad.sum())} NaN or infinite values (of {bad.numel()}); "
                             "prepare the input again from the image with vqa.prepare(image, question, answer), "
                             "or replace the non-finite pixels before running a method")
    return pixel_values


def check_box(box, image_size, where: str = "the preprocessed image") -> list[float]:
    """``box`` as four floats ``[x0, y0, x1, y1]`` inside an image of ``image_size`` ``(height, width)``
    with ``x0 < x1``, ``y0 < y1``; anything else is one clear error naming the fix."""
    height, width = (float(v) for v in image_size)
    try:
        values = [float(v) for v in box]
    except (TypeError, ValueError):
        values = []
    if len(values) != 4:
        raise ValueError(f"box must be [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = values
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"box {values} is not inside {where} of {int(width)} x {int(height)} pixels "
                         "(0 <= x0 < x1 <= width, 0 <= y0 < y1 <= height); a box in the original image's "
                         "pixels must go through inp.box_to_model(box) first")
    return values


def build_prompt(processor, question: str) -> str:
    """The generation prompt for ``question`` in the model's chat format."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return LLAVA_15_TEMPLATE.format(question=question)


def check_image(image):
    """Accept a PIL RGB image or an ``[H, W, 3]`` uint8 array; anything else is a clear error."""
    from PIL import Image

    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"an image array must be [H, W, 3] uint8, got shape {image.shape} dtype {image.dtype}"
            )
        return Image.fromarray(image)
    if not isinstance(image, Image.Image):
        raise TypeError(f"image must be a PIL.Image or an [H, W, 3] uint8 array, got {type(image).__name__}")
    if image.mode != "RGB":
        raise ValueError(f"image mode is {image.mode!r}, expected 'RGB'; pass image.convert('RGB')")
    return image


def _find_subsequence(haystack: list[int], needle: list[int]) -> int:
    for start in range(len(haystack) - len(needle), -1, -1):
        if haystack[start:start + len(needle)] == needle:
            return start
    return -1


def prepare(processor, adapter: ModelAdapter, image, question: str, answer: str | None = None) -> PreparedInput:
    """Build a :class:`PreparedInput` for ``image`` and ``question``, teacher-forcing ``answer``."""
    if not isinstance(question, str) or not question.strip():
        raise ValueError("question must be a non-empty string")
    image = check_image(image)
    adapter.check_image_size(*image.size, getattr(processor, "image_processor", None))
    tokenizer = processor.tokenizer
    prompt = build_prompt(processor, question)
    if getattr(processor, "image_token", "<image>") not in prompt:
        raise ValueError(f"the prompt has no image token: {prompt!r}")
    prompt_enc = processor(images=image, text=prompt, return_tensors="pt")
    prompt_ids = prompt_enc["input_ids"][0].tolist()
    if answer is not None:
        if not isinstance(answer, str) or not answer.strip():
            raise ValueError("answer must be a non-empty string or None")
        full = processor(images=image, text=f"{prompt} {answer.strip()}", return_tensors="pt")
        full_ids = full["input_ids"][0].tolist()
        if full_ids[: len(prompt_ids)] != prompt_ids:
            # The answer merged with the prompt's last token: keep the prompt's tokens as they are
            # and append the answer tokenized on its own.
            answer_ids = tokenizer(" " + answer.strip(), add_special_tokens=False)["input_ids"]
            full_ids = prompt_ids + answer_ids
            full = dict(prompt_enc, input_ids=torch.tensor([full_ids]),
                        attention_mask=torch.ones(1, len(full_ids), dtype=torch.long))
            for key in ("token_type_ids", "mm_token_type_ids"):  # image-token marks (Gemma-3, Qwen-VL): the answer is text (0)
                if key in full:
                    marks = torch.as_tensor(full[key])
                    full[key] = torch.nn.functional.pad(marks, (0, len(full_ids) - marks.shape[-1]))
        if len(full_ids) == len(prompt_ids):
            raise ValueError(f"the answer {answer!r} tokenizes to no tokens")
        enc = full
    else:
        enc = prompt_enc
    input_ids = torch.as_tensor(enc["input_ids"])
    ids = input_ids[0].tolist()
    # the image's layout: Qwen-VL's patch grid, LLaVA-NeXT's original size; processors that return
    # neither (InternVL's tiles): the original size, which tiled geometries need
    if "image_grid_thw" in enc:
        layout = enc["image_grid_thw"]
    else:
        layout = enc.get("image_sizes", torch.tensor([[image.height, image.width]]))
    geometry = adapter.image_geometry(input_ids[0], enc["pixel_values"], layout)

    question_ids = tokenizer(question, add_special_tokens=False)["input_ids"]
    start = _find_subsequence(prompt_ids, question_ids)
    if start < 0:  # the template changed the question's first token: take what follows the image
        start = int(geometry.positions.max()) + 1
        question_positions = torch.arange(start, len(prompt_ids))
    else:
        question_positions = torch.arange(start, start + len(question_ids))
    extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "pixel_values")}
    image_processor = processor.image_processor
    return PreparedInput(
        input_ids=input_ids,
        attention_mask=torch.as_tensor(enc["attention_mask"]),
        pixel_values=adapter.prepared_pixels(enc),
        str_tokens=tokenizer.convert_ids_to_tokens(ids),
        prompt=prompt,
        question=question,
        answer=answer.strip() if answer is not None else None,
        prompt_length=len(prompt_ids),
        image_positions=geometry.positions,
        question_positions=question_positions,
        answer_positions=torch.arange(len(prompt_ids), len(ids)),
        geometry=geometry,
        image=image,
        image_mean=tuple(getattr(image_processor, "image_mean", (0.5, 0.5, 0.5))),
        image_std=tuple(getattr(image_processor, "image_std", (0.5, 0.5, 0.5))),
        pixel_transform=adapter.pixel_transform(image_processor, image.size, geometry.image_size),
        extra=extra,
    )


@dataclass
class BatchedInput:
    """Several :class:`PreparedInput` left-padded into one batch.

    Row ``i``'s sequence position ``p`` sits at ``p + offsets[i]`` in the batch. Position ids are
    computed from the attention mask, so every row gives the same logits as it would alone.
    """

    items: list[PreparedInput]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: torch.Tensor
    offsets: torch.Tensor
    extra: dict = field(default_factory=dict)

    def model_inputs(self, device=None, dtype=None) -> dict:
        pixel = self.pixel_values if dtype is None else self.pixel_values.to(dtype)
        position_ids = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)
        out = {"input_ids": self.input_ids, "attention_mask": self.attention_mask, "pixel_values": pixel,
               "position_ids": position_ids, **self.extra}
        return {k: v.to(device) if device is not None and torch.is_tensor(v) else v for k, v in out.items()}

    def batch_positions(self, positions: list[int] | torch.Tensor) -> torch.Tensor:
        """``[B, P]``: per-row positions (one list per row, or shared) shifted into the batch."""
        positions = torch.as_tensor(positions, dtype=torch.long)
        if positions.dim() == 1:
            positions = positions.unsqueeze(0).expand(len(self.items), -1)
        return positions + self.offsets.unsqueeze(1)


def collate(items: list[PreparedInput], pad_token_id: int) -> BatchedInput:
    """Left-pad prepared inputs into a :class:`BatchedInput`."""
    if not items:
        raise ValueError("collate needs at least one prepared input")
    length = max(item.seq_len for item in items)
    ids = torch.full((len(items), length), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    offsets = torch.tensor([length - item.seq_len for item in items])
    for row, item in enumerate(items):
        ids[row, offsets[row]:] = item.input_ids[0]
        mask[row, offsets[row]:] = item.attention_mask[0]
    pixels = [item.pixel_values for item in items]
    if pixels[0].dim() == 3:  # flattened patches (Qwen-VL): one list of every row's patches, split by the grids
        pixels = [torch.cat([p.reshape(-1, p.shape[-1]) for p in pixels]).unsqueeze(0)]
    elif pixels[0].dim() == 5:  # tiled images: pad every row to the most views (the model reads image_sizes)
        most = max(p.shape[1] for p in pixels)
        pixels = [torch.nn.functional.pad(p, (0, 0, 0, 0, 0, 0, 0, most - p.shape[1])) for p in pixels]
    elif len({tuple(p.shape[-2:]) for p in pixels}) > 1:
        # images of their own sizes (Mistral-3): zero-padded right and bottom, as the processor batches them; the
        # model crops each row back to its image_sizes
        height, width = max(p.shape[-2] for p in pixels), max(p.shape[-1] for p in pixels)
        pixels = [torch.nn.functional.pad(p, (0, width - p.shape[-1], 0, height - p.shape[-2])) for p in pixels]
    extra = {}
    for key, value in items[0].extra.items():
        if torch.is_tensor(value) and value.dim() == 2 and all(
                item.extra[key].shape[-1] == item.seq_len for item in items):
            # per-token inputs (Gemma-3's token_type_ids, Qwen-VL's mm_token_type_ids): left-padded like the ids,
            # padding marked 0 (text)
            extra[key] = torch.zeros((len(items), length), dtype=value.dtype)
            for row, item in enumerate(items):
                extra[key][row, offsets[row]:] = item.extra[key][0]
        elif torch.is_tensor(value) and value.dim() >= 3 and len({item.extra[key].shape[1] for item in items}) > 1:
            # per-view inputs (Idefics3's pixel_attention_mask): padded with empty views like the pixels
            most = max(item.extra[key].shape[1] for item in items)
            extra[key] = torch.cat([torch.nn.functional.pad(item.extra[key], (0, 0) * (value.dim() - 2)
                                                            + (0, most - item.extra[key].shape[1]))
                                    for item in items])
        elif torch.is_tensor(value):
            extra[key] = torch.cat([item.extra[key] for item in items])
    return BatchedInput(items, ids, mask, torch.cat(pixels), offsets, extra)
