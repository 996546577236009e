import numpy as np
import pytest
import torch

from conftest import ANSWER, QUESTION


def test_positions_are_labelled(prepared):
    toks = prepared.str_tokens
    assert [toks[i] for i in prepared.question_positions] == ["what", "is", "the", "color", "of", "the", "dog", "?"]
    assert [toks[i] for i in prepared.answer_positions] == ["the", "dog", "is", "red", "."]
    assert prepared.prompt.startswith("USER: <image>\n") and prepared.prompt.endswith("ASSISTANT:")
    assert prepared.prompt_length == int(prepared.answer_positions[0])


def test_targets_are_teacher_forced(prepared):
    t = prepared.target(3)
    assert t.token == "red" and t.position == int(prepared.answer_positions[3]) - 1
    assert t.token_id == int(prepared.input_ids[0, t.position + 1])
    assert prepared.target(position=t.position) == t
    assert len(prepared.answer_targets()) == 5


def test_target_position_outside_sequence(prepared):
    with pytest.raises(IndexError, match="outside the sequence"):
        prepared.target(position=prepared.seq_len + 3)
    with pytest.raises(IndexError, match="last one"):
        prepared.target(position=prepared.seq_len - 1)
    with pytest.raises(IndexError, match="answer token 9 is out of range"):
        prepared.target(9)


def test_greedy_answer_when_none_given(tiny_vqa, image):
    inp = tiny_vqa.prepare(image, QUESTION, max_new_tokens=3)
    assert inp.answer is not None and inp.answer_positions.numel() >= 1
    # the forced answer is what greedy decoding produces
    with torch.no_grad():
        logits = tiny_vqa.logits(inp)
    first = inp.target(0)
    assert int(logits[0, first.position].argmax()) == first.token_id


def test_bad_images(tiny_vqa, image):
    with pytest.raises(ValueError, match="mode is 'L'"):
        tiny_vqa.prepare(image.convert("L"), QUESTION, ANSWER)
    with pytest.raises(TypeError, match="PIL.Image"):
        tiny_vqa.prepare("not an image", QUESTION, ANSWER)
    arr = np.zeros((10, 10), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"\[H, W, 3\] uint8"):
        tiny_vqa.prepare(arr, QUESTION, ANSWER)
    with pytest.raises(ValueError, match="question must be"):
        tiny_vqa.prepare(image, "  ", ANSWER)


def test_display_image_matches_pixels(prepared):
    shown = prepared.display_image()
    assert shown.shape == (32, 32, 3) and 0 <= shown.min() and shown.max() <= 1


@torch.no_grad()
def test_batched_rows_equal_single_rows(tiny_vqa, image):
    a = tiny_vqa.prepare(image, QUESTION, ANSWER)
    b = tiny_vqa.prepare(image.rotate(90), "What is the shape of the big red ball?", "A circle.")
    batch = tiny_vqa.batch([a, b])
    assert batch.offsets.tolist() == [max(a.seq_len, b.seq_len) - a.seq_len, max(a.seq_len, b.seq_len) - b.seq_len]
    logits = tiny_vqa.logits(batch)
    for row, item in enumerate([a, b]):
        off = int(batch.offsets[row])
        torch.testing.assert_close(logits[row, off:], tiny_vqa.logits(item)[0], rtol=1e-4, atol=1e-5)


def test_box_maps_through_resize_and_centre_crop(tiny_vqa):
    from PIL import Image

    pixels = np.zeros((40, 64, 3), dtype=np.uint8)
    pixels[:, 20] = 255  # a bright column at x = 20 of the original
    inp = tiny_vqa.prepare(Image.fromarray(pixels), QUESTION, ANSWER)
    column = int(torch.as_tensor(inp.display_image()).mean(dim=(0, 2)).argmax())
    x0, _, x1, _ = inp.box_to_model([20, 0, 21, 40])
    assert x0 <= column + 0.5 <= x1 + 1  # the mapped box covers where the column landed
    assert inp.box_to_model([0, 0, 64, 40]) == [0.0, 0.0, 32.0, 32.0]  # clipped to the crop


def test_chat_template_is_used_when_the_processor_has_one(image):
    """LLaVA-1.5 form without a template; the processor's own chat template when it has one."""
    from mech_vqa import VQAModel
    from mech_vqa.build import tiny_llava

    model, processor = tiny_llava(seed=0)
    processor.chat_template = (
        "{% for m in messages %}{{ m['role'] }} : {% for c in m['content'] %}"
        "{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %} . {% endfor %}"
        "{% if add_generation_prompt %}assistant :{% endif %}")
    inp = VQAModel(model, processor).prepare(image, QUESTION, ANSWER)
    assert inp.prompt == "user : <image> What is the color of the dog? . assistant :"
    assert [inp.str_tokens[p] for p in inp.question_positions][:2] == ["what", "is"]
    assert [inp.str_tokens[p] for p in inp.answer_positions] == ["the", "dog", "is", "red", "."]


def test_positions_in_box(prepared):
    inside = prepared.positions_in_box([0, 0, 16, 16])  # the top-left 2 x 2 cells of the 4 x 4 grid
    rowcol = {tuple(prepared.geometry.rowcol[prepared.geometry.positions.tolist().index(p)].tolist()) for p in inside}
    assert rowcol == {(0, 0), (0, 1), (1, 0), (1, 1)}
