"""The shipped checkpoint loads (also with plain transformers) and answers; evaluate() scores maps."""

import pytest
import torch

from mech_vqa.organism import ORGANISM_DIR, generate_items, load_organism
from mech_vqa.organism.evaluate import cells_in_box, evaluate, format_report, localisation_scores, patch_grid


@pytest.fixture(scope="module")
def organism():
    return load_organism()


def test_plain_transformers_load():
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(ORGANISM_DIR)
    processor = AutoProcessor.from_pretrained(ORGANISM_DIR)
    cfg = model.config
    assert cfg.vision_config.image_size // cfg.vision_config.patch_size >= 8  # heatmaps of >= 8 x 8 cells
    assert cfg.text_config.num_key_value_heads < cfg.text_config.num_attention_heads  # grouped-query
    assert processor.tokenizer("USER: <image>\nWhat?")["input_ids"]


def test_accuracy_on_fresh_questions(organism):
    model, processor = organism
    assert not model.training
    result = evaluate(model, processor, n=100, seed=123)
    assert result["accuracy"] >= 0.90, result


def test_greedy_answer(organism):
    model, processor = organism
    result = evaluate(model, processor, n=4, seed=5, generate=True)
    assert result["exact_match"] >= 0.75, result


def test_cells_in_box():
    inside = cells_in_box((8, 0, 24, 16), rows=8, cols=8, patch=8)  # centres 12, 20 in x; 4, 12 in y
    assert inside.sum() == 4 and inside[0, 1] and inside[1, 2] and not inside[2, 1]


def test_methods_are_scored(organism):
    model, processor = organism
    rows, cols, patch = patch_grid(model, processor)

    def oracle(model, processor, item):
        return cells_in_box(item.box, rows, cols, patch).float()

    def anti(model, processor, item):
        return 1.0 - oracle(model, processor, item)

    def constant(model, processor, item):
        return torch.ones(rows, cols)

    items = generate_items(10, seed=9)
    result = evaluate(model, processor, items=items, methods={"oracle": oracle, "anti": anti, "constant": constant})
    assert result["methods"]["oracle"] == {"pointing_game": 1.0, "inside_share": 1.0, "uninformative": 0}
    assert result["methods"]["anti"] == {"pointing_game": 0.0, "inside_share": 0.0, "uninformative": 0}
    # a constant map points nowhere: counted apart, never a hit or a miss
    assert result["methods"]["constant"]["pointing_game"] is None and result["methods"]["constant"]["uninformative"] == 10
    assert "uninformative (constant) maps 10/10" in format_report(result)
    assert 0 < result["chance"] < 0.5
    assert localisation_scores(torch.zeros(rows, cols), items[0].box, patch) == (None, 0.0)
    with pytest.raises(ValueError, match="must return a 8x8 map"):
        evaluate(model, processor, items=items[:1], methods={"bad": lambda m, p, it: torch.zeros(rows + 1, cols)})


def test_library_methods_plug_in(organism):
    """Every patch method of the library scores through the unchanged evaluation entry point."""
    from mech_vqa.compare import DEFAULT_METHODS
    from mech_vqa.organism.evaluate import library_method

    model, processor = organism
    items = [it for it in generate_items(6, seed=21) if it.family == "color"][:3]
    methods = {name: library_method(name, igos={"mask_size": 8, "iterations": 2, "n_steps": 4})
               for name in DEFAULT_METHODS}
    result = evaluate(model, processor, items=items, methods=methods)
    assert set(result["methods"]) == set(DEFAULT_METHODS)
    # the mechanistic top-head map localises the object on these colour questions
    assert result["methods"]["mechanistic"]["inside_share"] > result["chance"]
