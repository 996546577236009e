"""Real-scale Qwen-VL geometry on weightless (meta-device) models of released checkpoints.

Configs and image-processor settings are the published ones (``mech_vqa.build.QWEN_REFERENCE``); no
weights are needed, since the geometry comes from the processor's output and the model's config. For
every size the adapter's grid and token count agree with the processor's ``image_grid_thw``, its own
token count rule (``_get_num_multimodal_tokens``) and HF's ``smart_resize``, and each token's (row, col)
is the height / width M-RoPE position the model itself gives it (``get_rope_index``).
"""

import pytest
import torch

from mech_vqa import VQAModel
from mech_vqa.build import QWEN_REFERENCE, qwen_vl_reference

SIZES = [(640, 480), (480, 640), (1000, 300), (1920, 1080), (300, 2000), (512, 512)]   # (width, height)


@pytest.fixture(scope="module", params=sorted(QWEN_REFERENCE))
def reference_vqa(request):
    model, processor = qwen_vl_reference(request.param)
    assert next(model.parameters()).device.type == "meta"
    return VQAModel(model, processor, name=request.param)


def test_dimensions_are_the_checkpoints(reference_vqa):
    spec = QWEN_REFERENCE[reference_vqa.name]["text"]
    adapter = reference_vqa.adapter
    assert (adapter.n_layers, adapter.n_heads, adapter.n_kv_heads, adapter.d_model) == (
        spec["num_hidden_layers"], spec["num_attention_heads"], spec["num_key_value_heads"], spec["hidden_size"])
    assert adapter.head_dim == spec.get("head_dim", spec["hidden_size"] // spec["num_attention_heads"])
    vision = QWEN_REFERENCE[reference_vqa.name]["vision"]
    assert adapter.token_size == vision["patch_size"] * vision["spatial_merge_size"]
    assert adapter.deepstack_layers() == list(range(len(vision.get("deepstack_visual_indexes", []))))


@pytest.mark.parametrize("size", SIZES)
def test_grid_and_token_count_agree_with_the_processor(reference_vqa, size):
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    vqa, adapter = reference_vqa, reference_vqa.adapter
    width, height = size
    inp = vqa.prepare(Image.new("RGB", size, (90, 120, 200)), "What is the color of the dog?", "red")
    geometry = inp.geometry
    settings = QWEN_REFERENCE[vqa.name]["processor"]
    side = settings["patch_size"] * settings["merge_size"]
    resized = smart_resize(height, width, side, settings["min_pixels"], settings["max_pixels"])
    assert geometry.image_size == resized
    grid_thw = inp.extra["image_grid_thw"][0].tolist()
    assert grid_thw == [1, resized[0] // settings["patch_size"], resized[1] // settings["patch_size"]]
    assert geometry.grid == (grid_thw[1] // settings["merge_size"], grid_thw[2] // settings["merge_size"])
    counted = vqa.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])["num_image_tokens"][0]
    n_prompt = int((inp.input_ids[0] == adapter.image_token_id).sum())
    assert geometry.n_tokens == counted == n_prompt == geometry.grid[0] * geometry.grid[1]
    assert inp.pixel_values.shape[1] == grid_thw[1] * grid_thw[2]
    # the proportions survive the resize within a token per side
    assert abs(resized[1] / resized[0] - width / height) <= (side / min(resized)) * (width / height) * 2
    # every token's (row, col) is the model's own M-RoPE height / width position (offset by the image's start)
    positions, _ = vqa.model.model.get_rope_index(inp.input_ids, inp.extra["mm_token_type_ids"],
                                                  image_grid_thw=inp.extra["image_grid_thw"])
    image = positions[:, 0, geometry.positions]                               # [3, n_tokens]
    start = image[0, 0]
    assert torch.equal(image[0], start.expand(geometry.n_tokens))
    assert torch.equal(image[1] - start, geometry.rowcol[:, 0])
    assert torch.equal(image[2] - start, geometry.rowcol[:, 1])
    assert inp.box_to_model([0, 0, width, height]) == [0.0, 0.0, float(resized[1]), float(resized[0])]
