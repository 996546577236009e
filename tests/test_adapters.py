import pytest
import torch
from torch import nn

from mech_vqa import AdapterError, get_adapter
from mech_vqa.build import llava_config, random_llava, tiny_llava, word_level_tokenizer


def test_dimensions_and_modules(tiny_vqa):
    a = tiny_vqa.adapter
    assert (a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.d_model) == (2, 4, 2, 16, 64)
    assert a.layer(1) is tiny_vqa.model.model.language_model.layers[1]
    assert a.o_proj(0) is tiny_vqa.model.model.language_model.layers[0].self_attn.o_proj
    assert a.final_norm is tiny_vqa.model.model.language_model.norm
    assert a.unembed is tiny_vqa.model.lm_head
    assert a.projector is tiny_vqa.model.model.multi_modal_projector
    assert a.W_O(0).shape == (4, 16, 64)
    norm = a.final_norm_params()
    assert norm["kind"] == "rms" and norm["weight"].shape == (64,) and norm["eps"] > 0
    assert a.patch_grid == (4, 4) and a.tokens_per_image() == 16


def test_w_o_reassembles_o_proj(tiny_vqa):
    a = tiny_vqa.adapter
    z = torch.randn(3, a.n_heads * a.head_dim)
    per_head = torch.einsum("bhd,hdm->bm", z.view(3, a.n_heads, a.head_dim), a.W_O(1))
    torch.testing.assert_close(per_head, a.o_proj(1)(z))


def test_geometry(prepared, tiny_vqa):
    g = prepared.geometry
    assert g.grid == (4, 4) and g.image_size == (32, 32)
    ids = prepared.input_ids[0]
    assert (ids[g.positions] == tiny_vqa.adapter.image_token_id).all()
    assert (ids == tiny_vqa.adapter.image_token_id).sum() == g.n_tokens == 16
    # row-major grid, 8-pixel boxes
    assert g.rowcol[5].tolist() == [1, 1]
    assert g.boxes[5].tolist() == [8.0, 8.0, 16.0, 16.0]
    grid = g.to_grid(torch.arange(16.0))
    assert grid[1, 2] == 6
    with pytest.raises(ValueError, match="one per image token"):
        g.to_grid(torch.zeros(5))


def test_unknown_model_class_is_one_clear_error():
    with pytest.raises(AdapterError, match="no mech_vqa adapter knows Linear"):
        get_adapter(nn.Linear(2, 2))


def test_layer_out_of_range(tiny_vqa):
    with pytest.raises(IndexError, match="layer 7 is out of range"):
        tiny_vqa.adapter.layer(7)
    with pytest.raises(IndexError, match="head 9 is out of range"):
        tiny_vqa.adapter.check_head(9)


def test_prompt_without_image_token(tiny_vqa):
    ids = torch.tensor([5, 6, 7])
    with pytest.raises(AdapterError, match="no image token"):
        tiny_vqa.adapter.image_geometry(ids)


def test_image_tokens_not_matching_features(tiny_vqa):
    image_id = tiny_vqa.adapter.image_token_id
    ids = torch.tensor([5] + [image_id] * 7 + [6])
    with pytest.raises(AdapterError, match="7 image tokens but each image gives 16"):
        tiny_vqa.adapter.image_geometry(ids)


def test_full_feature_strategy_skips_cls():
    tokenizer = word_level_tokenizer(["dog"])
    config = llava_config(tokenizer, image_size=32, patch_size=8)
    config.vision_feature_select_strategy = "full"
    adapter = get_adapter(random_llava(config))
    image_id = adapter.image_token_id
    geometry = adapter.image_geometry(torch.tensor([1] + [image_id] * 17 + [2]))
    assert geometry.positions.tolist() == list(range(2, 18))


def test_siglip_tower_has_no_class_token(tiny_qwen2_vqa, image):
    """LLaVA-Interleave's layout: SigLIP, the "full" strategy, and every image token a patch."""
    adapter = tiny_qwen2_vqa.adapter
    assert tiny_qwen2_vqa.model.config.vision_feature_select_strategy == "full"
    assert not adapter.has_cls_token and adapter.tokens_per_image() == 16
    inp = tiny_qwen2_vqa.prepare(image, "What is the color of the dog?", "The dog is red.")
    assert inp.geometry.positions.numel() == 16
    assert (inp.input_ids[0, inp.geometry.positions] == adapter.image_token_id).all()
    # SigLIP stretches the 48 x 40 image to 32 x 32 (no crop)
    assert inp.box_to_model([0, 0, 24, 20]) == [0.0, 0.0, 16.0, 16.0]


def test_from_pretrained_roundtrip(tmp_path, image):
    from mech_vqa import VQAModel

    model, processor = tiny_llava(seed=3)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = VQAModel.from_pretrained(str(tmp_path))
    original = VQAModel(model, processor)
    inp = loaded.prepare(image, "What is the color of the dog?", "red")
    torch.testing.assert_close(loaded.logits(inp), original.logits(inp))
