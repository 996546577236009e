"""The control organism (trained without the attention scaffold) loads plainly, answers, and is named."""

import json

import pytest

from mech_vqa import VQAModel
from mech_vqa.organism import ORGANISM_DIR, ORGANISM_FREE_DIR, ORGANISMS, load_organism, organism_dir
from mech_vqa.organism.evaluate import evaluate

FRESH_SEED = 20261201  # neither a training seed ([0, step]), the validation seed (777) nor evaluate's (4242)
TARGET = 0.95  # the control organism's accuracy target on 2-4 objects; measured 0.990 on these 200 questions


@pytest.fixture(scope="module")
def fresh_result():
    """Accuracy of the free organism, loaded with plain transformers, on 200 fresh 2-4 object questions."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(ORGANISM_FREE_DIR).eval()
    processor = AutoProcessor.from_pretrained(ORGANISM_FREE_DIR)
    result = evaluate(model, processor, n=200, seed=FRESH_SEED, min_objects=2, max_objects=4)
    assert all(result["by_group"][f"objects={count}"]["n"] > 0 for count in (2, 3, 4))
    return result


def test_plain_transformers_load_and_the_95_percent_target(fresh_result):
    # chance (uniform over the objects present) is about 0.36 on 2-4 objects; before retrieval
    # emerged the training runs sat at 0.3-0.45
    assert fresh_result["accuracy"] >= TARGET, fresh_result
    for count in (2, 3, 4):
        assert fresh_result["by_group"][f"objects={count}"]["accuracy"] >= 0.9, fresh_result


def test_free_checkpoint_was_trained_without_attention_loss():
    """The shipped log's own arguments give loss terms that name no attention, head or layer."""
    from argparse import Namespace

    from mech_vqa.organism.train import loss_terms, recipe_args

    log = json.loads((ORGANISM_FREE_DIR / "training_log.json").read_text())
    args = Namespace(**log["args"])
    assert args.attn_sup == 0 and log["loss_terms"] == loss_terms(args)
    assert not any(word in term.lower() for term in log["loss_terms"] for word in ("attention", "head", "layer"))
    # it is the "free" recipe, run as documented
    recipe = vars(recipe_args("free"))
    ignored = {"out", "threads", "stop_after", "export_to"}
    assert {k: v for k, v in vars(args).items() if k not in ignored} == {
        k: v for k, v in recipe.items() if k not in ignored}


def test_organism_by_name():
    assert organism_dir() == ORGANISM_DIR and organism_dir("free") == ORGANISM_FREE_DIR
    assert list(ORGANISMS) == ["scaffolded", "free"]
    with pytest.raises(ValueError, match="unknown organism 'scaffold'; choose one of 'scaffolded', 'free'"):
        organism_dir("scaffold")
    with pytest.raises(ValueError, match="choose one of"):
        VQAModel.organism("bogus")
    model, _ = load_organism(variant="free")
    assert model.config.vision_config.patch_size == json.loads(
        (ORGANISM_FREE_DIR / "config.json").read_text())["vision_config"]["patch_size"]
    assert VQAModel.organism("free").name == str(ORGANISM_FREE_DIR)


def test_head_ablation_accuracy_leaves_no_hook():
    from mech_vqa.organism import generate_items
    from mech_vqa.organism.evaluate import head_ablation_accuracy

    model, processor = load_organism(variant="free")
    items = generate_items(20, seed=FRESH_SEED + 1)
    hooks_before = {name: len(m._forward_pre_hooks) for name, m in model.named_modules()}
    result = head_ablation_accuracy(model, processor, items)
    cfg = model.config.text_config
    assert len(result) == 1 + cfg.num_hidden_layers * cfg.num_attention_heads
    assert result["clean"] == pytest.approx(evaluate(model, processor, items=items)["accuracy"], abs=1e-6)
    assert {name: len(m._forward_pre_hooks) for name, m in model.named_modules()} == hooks_before
