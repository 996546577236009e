"""The synthetic VQA generator: determinism, geometry and that answers match the pixels."""

import numpy as np
import pytest

from mech_vqa.build import word_level_tokenizer
from mech_vqa.organism import EVAL_DIR, load_eval_split
from mech_vqa.organism.synthetic import (
    ALL_FAMILIES, COLORS, SHADE, VQAItem, generate_items, vocabulary,
)


def _same(a: VQAItem, b: VQAItem) -> bool:
    return (a.question, a.answer, a.box, a.n_objects, a.family) == (b.question, b.answer, b.box, b.n_objects, b.family) \
        and np.array_equal(np.asarray(a.image), np.asarray(b.image)) and np.array_equal(a.mask, b.mask)


def test_same_seed_same_items():
    a, b = generate_items(20, seed=3), generate_items(20, seed=3)
    assert all(_same(x, y) for x, y in zip(a, b))


def test_different_seeds_differ():
    a, b = generate_items(20, seed=3), generate_items(20, seed=4)
    assert not all(_same(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def items():
    return generate_items(200, seed=11, min_objects=1, max_objects=4, families=ALL_FAMILIES)


def test_boxes_inside_image_and_disjoint(items):
    for it in items:
        w, h = it.image.size
        x0, y0, x1, y1 = it.box
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        assert it.mask.shape == (h, w) and it.mask.any()
        ys, xs = np.nonzero(it.mask)
        assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
        masks = [o.mask(h) for o in it.objects]
        assert np.array_equal(sum(m.astype(int) for m in masks) > 1, np.zeros((h, w), bool))  # no overlap
        assert it.n_objects == len(it.objects) and 1 <= it.n_objects <= 4


def test_named_attribute_is_unique(items):
    for it in items:
        assert len({o.color for o in it.objects}) == it.n_objects
        assert len({o.pattern for o in it.objects}) == it.n_objects


def _colour_of_mask(it: VQAItem) -> str:
    """The colour whose (plain or shaded) RGB covers every pixel of the mask."""
    pixels = np.asarray(it.image)[it.mask].astype(int)
    for name, rgb in COLORS.items():
        plain, dark = np.array(rgb), np.round(np.array(rgb) * SHADE)
        if np.all((pixels == plain).all(1) | (pixels == dark).all(1)):
            return name
    raise AssertionError("mask pixels are not one object colour")


def test_answer_matches_pixels(items):
    for it in items:
        target = it.objects[it.target]
        assert it.answer.endswith(it.answer_word) and it.answer_word in it.answer.split()
        colour = _colour_of_mask(it)
        assert colour == target.color
        if it.family == "color":
            assert it.answer_word == colour
        else:  # the object is named by its colour in the question
            assert f" {colour} " in it.question
        if it.family == "pattern":
            assert it.answer_word == target.pattern
        if it.family == "shape":
            assert it.answer_word == target.shape


def test_vocabulary_covers_all_text(items):
    tokenizer = word_level_tokenizer(vocabulary())
    for it in items[:50]:
        ids = tokenizer(f"{it.question} {it.answer}")["input_ids"]
        assert tokenizer.unk_token_id not in ids


def test_row_round_trip(tmp_path, items):
    it = items[0]
    it.image.save(tmp_path / "a.png")
    back = VQAItem.from_row(it.to_row("a.png"), tmp_path)
    assert _same(it, back)


def test_shipped_eval_split():
    split = load_eval_split(EVAL_DIR)
    assert 40 <= len(split) <= 100
    assert sum(f.stat().st_size for f in EVAL_DIR.rglob("*") if f.is_file()) < 1_000_000
    assert all(2 <= it.n_objects <= 4 for it in split)
    assert {it.n_objects for it in split} == {2, 3, 4}
    for it in split:
        assert _colour_of_mask(it) == it.objects[it.target].color
