"""The model organism: a tiny LLaVA trained on synthetic VQA whose answer region is known exactly.

It is the default model of the demo, notebooks and tests, and the ground truth patch-importance
methods are scored against (see :mod:`mech_vqa.organism.evaluate`). The trained checkpoint lives
in ``data/organism`` (``ORGANISM_DIR``) and loads with plain transformers as well::

    from mech_vqa.organism import load_organism, generate_items
    model, processor = load_organism()
    item = generate_items(1, seed=0)[0]   # .image, .question, .answer, .answer_word, .box, .mask
"""

from __future__ import annotations

from pathlib import Path

from mech_vqa.organism.model import answer_prefix, build_organism, encode, predict_answer_words, prompt
from mech_vqa.organism.synthetic import (
    ALL_FAMILIES,
    COLORS,
    FAMILIES,
    PATTERNS,
    SHAPES,
    SceneObject,
    VQAItem,
    generate_item,
    generate_items,
    load_eval_split,
    vocabulary,
    write_eval_split,
)

ORGANISM_DIR = Path(__file__).resolve().parents[2] / "data" / "organism"
# The control organism: trained with the answer losses only, no attention scaffold (docs/organism.md).
ORGANISM_FREE_DIR = Path(__file__).resolve().parents[2] / "data" / "organism_free"
EVAL_DIR = Path(__file__).resolve().parents[2] / "data" / "eval"

# The shipped organisms by name; the first is the default everywhere.
ORGANISMS = {"scaffolded": ORGANISM_DIR, "free": ORGANISM_FREE_DIR}


def organism_dir(variant: str = "scaffolded") -> Path:
    """The folder of a shipped organism: ``"scaffolded"`` (default) or ``"free"`` (no attention scaffold)."""
    if variant not in ORGANISMS:
        raise ValueError(f"unknown organism {variant!r}; choose one of {', '.join(map(repr, ORGANISMS))}")
    return ORGANISMS[variant]


def load_organism(path: str | Path | None = None, dtype=None, variant: str = "scaffolded"):
    """``(model, processor)`` of a trained organism, model in eval mode.

    ``path`` (a saved folder) wins over ``variant`` (a shipped organism by name, see :data:`ORGANISMS`).
    """
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    path = Path(path) if path is not None else organism_dir(variant)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = LlavaForConditionalGeneration.from_pretrained(path, **kwargs).eval()
    return model, AutoProcessor.from_pretrained(path)


__all__ = [
    "ALL_FAMILIES", "COLORS", "EVAL_DIR", "FAMILIES", "ORGANISM_DIR", "ORGANISM_FREE_DIR", "ORGANISMS", "PATTERNS", "SHAPES", "SceneObject", "VQAItem",
    "answer_prefix", "build_organism", "encode", "generate_item", "generate_items", "load_eval_split",
    "load_organism", "organism_dir", "predict_answer_words", "prompt", "vocabulary", "write_eval_split",
]
