"""The organism's architecture, prompt format and batching.

The model is an ordinary ``LlavaForConditionalGeneration`` built with :mod:`mech_vqa.build`
(CLIP-style vision tower, Llama text model with grouped-query attention, word-level tokenizer),
so it round-trips through ``save_pretrained`` / ``from_pretrained`` with plain transformers.
Prompts use the LLaVA-1.5 form ``USER: <image>\\n{question} ASSISTANT: {answer}``.
"""

from __future__ import annotations

import torch

from mech_vqa.build import llava_config, llava_processor, random_llava, word_level_tokenizer
from mech_vqa.organism.synthetic import IMAGE_SIZE, VQAItem, vocabulary

# 64 px images in 8 px patches: an 8 x 8 patch grid, fine enough for heatmaps to mean something.
DEFAULT_SIZES = dict(
    image_size=IMAGE_SIZE, patch_size=8, vision_hidden=96, vision_layers=2, vision_heads=4,
    hidden=128, layers=4, heads=4, kv_heads=2,
)


def prompt(question: str) -> str:
    """The LLaVA-1.5 user turn, ending where the assistant's answer starts."""
    return f"USER: <image>\n{question} ASSISTANT:"


def answer_prefix(item: VQAItem) -> str:
    """The answer up to (not including) the answer word, e.g. "The color of the striped object is"."""
    return item.answer.rsplit(" ", 1)[0]


def build_organism(seed: int = 0, **sizes):
    """A freshly initialised organism ``(model, processor)``; ``sizes`` override ``DEFAULT_SIZES``."""
    sizes = {**DEFAULT_SIZES, **sizes}
    tokenizer = word_level_tokenizer(vocabulary())
    processor = llava_processor(tokenizer, sizes["image_size"], sizes["patch_size"])
    config = llava_config(tokenizer, **sizes)
    return random_llava(config, seed=seed), processor


def encode(processor, items: list[VQAItem], with_answer: bool = True) -> dict:
    """Tokenise a batch.

    ``with_answer=True`` (training): prompt + full answer + ``</s>``, with ``labels`` on the answer
    tokens only and ``answer_index`` pointing at the answer word's position.
    ``with_answer=False`` (evaluation): prompt + answer prefix, so the logits at the last position
    predict the answer word (teacher forcing). Padding is on the left, so the ends line up.
    """
    tokenizer = processor.tokenizer
    if with_answer:
        texts = [f"{prompt(it.question)} {it.answer}" for it in items]
    else:
        texts = [f"{prompt(it.question)} {answer_prefix(it)}" for it in items]
    batch = processor(text=texts, images=[it.image for it in items], return_tensors="pt", padding=True)
    batch = dict(batch)
    if not with_answer:
        return batch
    n = len(items)
    eos = torch.full((n, 1), tokenizer.eos_token_id, dtype=batch["input_ids"].dtype)
    batch["input_ids"] = torch.cat([batch["input_ids"], eos], dim=1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones_like(eos)], dim=1)
    labels = torch.full_like(batch["input_ids"], -100)
    for i, it in enumerate(items):
        k = len(tokenizer(" " + it.answer, add_special_tokens=False)["input_ids"]) + 1  # + </s>
        labels[i, -k:] = batch["input_ids"][i, -k:]
    batch["labels"] = labels
    batch["answer_index"] = torch.full((n,), batch["input_ids"].shape[1] - 2)  # the word before </s>
    return batch


def answer_loss(logits: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, correct): cross-entropy on the answer word plus the mean over the other answer tokens.

    The answer word is the only token that needs the image; the rest of the answer is copied from
    the question and is learned in a few dozen steps, so it gets a separate (mean) term instead of
    diluting the answer word's gradient. ``correct`` is a bool per item (argmax at the answer word).
    """
    labels = batch["labels"]
    pred_logits, targets = logits[:, :-1].float(), labels[:, 1:]
    rows = torch.arange(len(labels))
    word_pos = batch["answer_index"] - 1  # logits at position t predict token t + 1
    word_logits, word_targets = pred_logits[rows, word_pos], targets[rows, word_pos]
    word_loss = torch.nn.functional.cross_entropy(word_logits, word_targets)
    rest = targets.clone()
    rest[rows, word_pos] = -100
    rest_loss = torch.nn.functional.cross_entropy(pred_logits.reshape(-1, pred_logits.shape[-1]), rest.reshape(-1))
    return word_loss + rest_loss, word_logits.argmax(-1) == word_targets


@torch.no_grad()
def predict_answer_words(model, processor, items: list[VQAItem], batch_size: int = 100) -> list[str]:
    """The argmax word at the answer position after teacher-forcing the answer prefix."""
    words = []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        batch = encode(processor, chunk, with_answer=False)
        logits = model(**batch).logits[:, -1]
        words += processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
    return words
