"""Each bad input is one clear error naming the problem and the fix, raised before any hook is set,
and the model is left as found (parameters, modes, attention implementation, hooks)."""

import contextlib
import dataclasses
import json

import pytest
import torch

from conftest import assert_same_state, hook_snapshot, model_state
from mech_vqa import VQAModel, compare, explain, igos, insertion_deletion
from mech_vqa.cli import main as cli_main
from mech_vqa.inputs import check_box
from mech_vqa.model import ModelLoadError


@contextlib.contextmanager
def left_as_found(vqa):
    before, hooks = model_state(vqa.model), hook_snapshot(vqa.model)
    yield
    assert_same_state(before, model_state(vqa.model))
    assert hook_snapshot(vqa.model) == hooks


def test_nan_pixels_are_named_at_creation_and_after_an_in_place_edit(tiny_vqa, prepared):
    with pytest.raises(ValueError, match=r"pixel_values hold 3 NaN or infinite values .*vqa.prepare"):
        pixels = prepared.pixel_values.clone()
        pixels[0, 0, 0, :3] = float("nan")
        dataclasses.replace(prepared, pixel_values=pixels)
    edited = dataclasses.replace(prepared, pixel_values=prepared.pixel_values.clone())
    edited.pixel_values[0, 1, 2, 3] = float("inf")  # after creation: caught when the model reads it
    with left_as_found(tiny_vqa), pytest.raises(ValueError, match="1 NaN or infinite"):
        explain(tiny_vqa, edited, edited.target(3), progress=False)
    with left_as_found(tiny_vqa), pytest.raises(ValueError, match="1 NaN or infinite"):
        igos(tiny_vqa, edited, tokens=[3], iterations=1, n_steps=1, mask_size=2, progress=False)
    # pixels are checked once per tensor and version: an edit after a clean run is still caught
    clean = dataclasses.replace(prepared, pixel_values=prepared.pixel_values.clone())
    explain(tiny_vqa, clean, clean.target(3), progress=False)
    clean.pixel_values[0, 0, 1, 1] = float("nan")
    with left_as_found(tiny_vqa), pytest.raises(ValueError, match="1 NaN or infinite"):
        explain(tiny_vqa, clean, clean.target(3), progress=False)


def test_box_outside_the_image_is_an_error_in_explain_and_compare(tiny_vqa, prepared):
    height, width = prepared.geometry.image_size
    with left_as_found(tiny_vqa), pytest.raises(ValueError, match=rf"not inside the preprocessed image of "
                                                                   rf"{width} x {height} pixels.*box_to_model"):
        explain(tiny_vqa, prepared, prepared.target(3), box=[100, 100, 200, 200], progress=False)
    with left_as_found(tiny_vqa), pytest.raises(ValueError, match="not inside"):
        compare(tiny_vqa, prepared, methods=["raw_attention"], box=[0, 0, width + 1, 4], progress=False)
    with left_as_found(tiny_vqa), pytest.raises(ValueError, match="not inside"):
        igos(tiny_vqa, prepared, tokens=[3], box=[-1, 0, 4, 4], iterations=1, n_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"must be \[x0, y0, x1, y1\]"):
        check_box([1, 2, 3], (32, 32))
    with pytest.raises(ValueError, match="not inside"):
        check_box([8, 0, 4, 4], (32, 32))  # x0 > x1
    assert check_box([0, 0, width, height], (height, width)) == [0.0, 0.0, float(width), float(height)]
    # in range: the pointing game is answered, not silently False for a box nowhere on the image
    inside = explain(tiny_vqa, prepared, prepared.target(3), box=[0, 0, width, height], progress=False)
    assert inside.patch_map.pointing_game() == 1.0


def test_a_map_of_other_proportions_is_refused_by_insertion_deletion(tiny_vqa, prepared):
    rows, cols = tiny_vqa.adapter.patch_grid
    height, width = prepared.geometry.image_size
    with left_as_found(tiny_vqa), pytest.raises(ValueError, match=rf"3 x 5 cells but the model's patch grid is "
                                                                   rf"{rows} x {cols}"):
        insertion_deletion(tiny_vqa, prepared, torch.rand(3, 5), tokens=[3], progress=False)
    with pytest.raises(ValueError, match="smaller than a pixel"):
        insertion_deletion(tiny_vqa, prepared, torch.rand(2 * height, 2 * width), tokens=[3], progress=False)
    # accepted: the patch grid, a pixel-size map, a finer map of the image's proportions (an iGOS mask)
    for shape in [(rows, cols), (height, width), (2 * rows, 2 * cols)]:
        result = insertion_deletion(tiny_vqa, prepared, torch.rand(*shape), tokens=[3], step_fraction=0.5,
                                    progress=False)
        assert result.map_shape == list(shape)


def test_igos_mask_finer_than_the_pixels_is_refused(tiny_vqa, prepared):
    height, width = prepared.geometry.image_size
    with left_as_found(tiny_vqa), pytest.raises(ValueError, match=rf"mask_size \({4 * height}, {4 * width}\) is "
                                                                   rf"finer than the {height} x {width} pixels"):
        igos(tiny_vqa, prepared, tokens=[3], mask_size=4 * height, iterations=1, n_steps=1, progress=False)
    result = igos(tiny_vqa, prepared, tokens=[3], mask_size=(height, width), iterations=1, n_steps=1,
                  progress=False)  # one cell per pixel is the finest allowed
    assert tuple(result.saliency.shape) == (height, width)


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory, tiny_vqa):
    folder = tmp_path_factory.mktemp("model")
    tiny_vqa.model.save_pretrained(folder)
    tiny_vqa.processor.save_pretrained(folder)
    return folder


def test_truncated_checkpoint_is_one_clear_error(saved_model, tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for path in saved_model.iterdir():
        data = path.read_bytes()
        (broken / path.name).write_bytes(data[: len(data) // 3] if path.suffix == ".safetensors" else data)
    with pytest.raises(ModelLoadError, match="truncated or corrupt; copy or download the checkpoint again"):
        VQAModel.from_pretrained(broken)
    assert cli_main(["run", "answer", str(_one_row_dataset(tmp_path)), "--out", str(tmp_path / "r.jsonl"),
                     "--model", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated or corrupt" in err and "Traceback" not in err


def test_missing_or_empty_model_folder_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(ModelLoadError, match=r"model folder .*nowhere does not exist; give a folder written by "
                                             r"save_pretrained"):
        VQAModel.from_pretrained(tmp_path / "nowhere")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        VQAModel.from_pretrained(tmp_path)
    assert cli_main(["run", "answer", str(_one_row_dataset(tmp_path)), "--out", str(tmp_path / "r.jsonl"),
                     "--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Repo id" not in err


def _one_row_dataset(folder):
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(folder / "img.png")
    path = folder / "data.jsonl"
    path.write_text(json.dumps({"image": "img.png", "question": "What is the color of the dog?"}) + "\n")
    return path


def test_negative_limit_is_refused(tiny_vqa, tmp_path, capsys):
    from mech_vqa.dataset import run_dataset

    data = _one_row_dataset(tmp_path)
    with pytest.raises(SystemExit):
        cli_main(["run", "answer", str(data), "--out", str(tmp_path / "r.jsonl"), "--limit", "-1"])
    assert "--limit: expected a whole number >= 1, got -1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="limit must be a whole number >= 0"):
        run_dataset(tiny_vqa, data, tmp_path / "r.jsonl", "answer", limit=-1, progress=False)
    assert not (tmp_path / "r.jsonl").exists()
