"""Shared fixtures: tiny LLaVA models built from configs (no download), images, prepared inputs."""

from __future__ import annotations

import contextlib
import dataclasses
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from mech_vqa import VQAModel
from mech_vqa.build import tiny_llava

# Tiny models run fastest on one thread, and a second thread only fights other jobs on a 2-core box.
torch.set_num_threads(1)

QUESTION = "What is the color of the dog?"
ANSWER = "The dog is red."


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


def _warmed_up(vqa: VQAModel) -> VQAModel:
    """Run one forward: transformers 5.x adds its own output hooks on a model's first forward, and
    hook snapshots in the tests must not mistake those for hooks left behind."""
    from PIL import Image

    vqa.logits(vqa.prepare(Image.new("RGB", (32, 32)), QUESTION, ANSWER))
    return vqa


@pytest.fixture(scope="session")
def tiny_vqa() -> VQAModel:
    """Tiny LLaVA with grouped-query attention (4 heads, 2 kv heads), 4x4 patch grid."""
    model, processor = tiny_llava(seed=0, kv_heads=2)
    return _warmed_up(VQAModel(model, processor, name="tiny-gqa"))


@pytest.fixture(scope="session")
def tiny_mha_vqa() -> VQAModel:
    """Tiny LLaVA with plain multi-head attention and three layers."""
    model, processor = tiny_llava(seed=1, kv_heads=None, layers=3)
    return _warmed_up(VQAModel(model, processor, name="tiny-mha"))


@pytest.fixture(scope="session")
def tiny_mistral_vqa() -> VQAModel:
    """Tiny BakLLaVA-like model: Mistral text model whose 8-token sliding window is shorter than the prompt."""
    model, processor = tiny_llava(seed=2, kv_heads=2, text_model="mistral", sliding_window=8)
    return _warmed_up(VQAModel(model, processor, name="tiny-mistral-sliding"))


@pytest.fixture(scope="session")
def tiny_qwen2_vqa() -> VQAModel:
    """Tiny LLaVA-Interleave-like model: SigLIP tower (no class token, "full" strategy) and Qwen2 (q/k/v
    biases), text layer 0 full, layer 1 sliding (8 tokens)."""
    model, processor = tiny_llava(seed=3, kv_heads=2, text_model="qwen2", sliding_window=8, vision_model="siglip")
    return _warmed_up(VQAModel(model, processor, name="tiny-qwen2-sliding"))


@pytest.fixture(scope="session")
def tiny_gemma_vqa() -> VQAModel:
    """Tiny LLaVA-Gemma: norms scale by 1 + weight (randomised here so that it matters), embeddings by sqrt(d)."""
    model, processor = tiny_llava(seed=7, kv_heads=2, text_model="gemma")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:  # Gemma initialises its norm weights at 0 (gain 1)
                parameter.normal_(0, 0.5)
    return _warmed_up(VQAModel(model, processor, name="tiny-gemma"))


@pytest.fixture(scope="session")
def tiny_next_vqa() -> VQAModel:
    """Tiny LLaVA-NeXT: 32 px tiles, pinpoints 32 x 64 / 64 x 32 / 64 x 64, newline tokens."""
    from mech_vqa.build import tiny_llava_next

    model, processor = tiny_llava_next(seed=5)
    return _warmed_up(VQAModel(model, processor, name="tiny-llava-next"))


@pytest.fixture(scope="session")
def tiny_onevision_vqa() -> VQAModel:
    """Tiny LLaVA-OneVision: SigLIP, Qwen2, 32 px tiles, high-resolution grids beyond ~2 tiles downsampled."""
    from mech_vqa.build import tiny_llava_onevision

    model, processor = tiny_llava_onevision(seed=6)
    return _warmed_up(VQAModel(model, processor, name="tiny-llava-onevision"))


@pytest.fixture(scope="session")
def tiny_qwen2vl_vqa() -> VQAModel:
    """Tiny Qwen2-VL: 8 px patches merged 2 x 2 (16 px per token), dynamic resolution, M-RoPE sections
    (2, 3, 3) of the 8 rotary frequencies, grouped-query attention with q/k/v biases."""
    from mech_vqa.build import tiny_qwen_vl

    model, processor = tiny_qwen_vl(seed=8, family="qwen2_vl")
    return _warmed_up(VQAModel(model, processor, name="tiny-qwen2-vl"))


@pytest.fixture(scope="session")
def tiny_qwen25vl_vqa() -> VQAModel:
    """Tiny Qwen2.5-VL: as Qwen2-VL, its ViT windowed (32 px windows) in block 0 and full in block 1."""
    from mech_vqa.build import tiny_qwen_vl

    model, processor = tiny_qwen_vl(seed=9, family="qwen2_5_vl")
    return _warmed_up(VQAModel(model, processor, name="tiny-qwen2.5-vl"))


@pytest.fixture(scope="session")
def tiny_qwen3vl_vqa() -> VQAModel:
    """Tiny Qwen3-VL: interleaved M-RoPE, QK-norm (weights randomised so that it matters) and DeepStack
    (features of ViT block 0 added after decoder layer 0)."""
    from mech_vqa.build import tiny_qwen_vl

    model, processor = tiny_qwen_vl(seed=10, family="qwen3_vl")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "q_norm" in name or "k_norm" in name:  # initialised at 1: make the norms' gains matter
                parameter.normal_(1, 0.5)
    return _warmed_up(VQAModel(model, processor, name="tiny-qwen3-vl"))


@pytest.fixture(scope="session")
def tiny_gemma3_vqa() -> VQAModel:
    """Tiny Gemma-3: sandwich norms (randomised 1 + weight gains), QK-norm, sliding (8 keys) and global layers,
    16 pooled image tokens (2 x 2 SigLIP patches each) attending to each other bidirectionally."""
    from mech_vqa.build import tiny_gemma3

    model, processor = tiny_gemma3(seed=8)
    return _warmed_up(VQAModel(model, processor, name="tiny-gemma3"))


@pytest.fixture(scope="session")
def tiny_internvl_vqa() -> VQAModel:
    """Tiny InternVL: 32 px tiles (1..4 of them, plus a thumbnail beyond one), 8 x 8 patches with a class
    token, pixel shuffle 0.5 -> 16 tokens per view, Qwen2 text model."""
    from mech_vqa.build import tiny_internvl

    model, processor = tiny_internvl(seed=10)
    return _warmed_up(VQAModel(model, processor, name="tiny-internvl"))


@pytest.fixture(scope="session")
def tiny_idefics3_vqa() -> VQAModel:
    """Tiny Idefics3: 32 px tiles (up to 2 x 2) and a global image, <row_i_col_j> markers, 8 x 8 SigLIP
    patches, pixel shuffle 2 -> 16 tokens per view, Llama text model."""
    from mech_vqa.build import tiny_idefics3

    model, processor = tiny_idefics3(seed=11)
    return _warmed_up(VQAModel(model, processor, name="tiny-idefics3"))


@pytest.fixture(scope="session")
def tiny_mistral3_vqa() -> VQAModel:
    """Tiny Mistral-3: Pixtral tower (4 px patches, 2D RoPE), patch merger 2 x 2 -> 8 px tokens, images up to
    64 px (aspect kept), rows of [IMG] closed by [IMG_BREAK] / [IMG_END], Mistral text model."""
    from mech_vqa.build import tiny_mistral3

    model, processor = tiny_mistral3(seed=12)
    return _warmed_up(VQAModel(model, processor, name="tiny-mistral3"))


@pytest.fixture(params=["next", "onevision"])
def tiled_vqa(request) -> VQAModel:
    """The adapters whose images come as several views (tiles)."""
    return request.getfixturevalue(f"tiny_{request.param}_vqa")


FAMILIES = {"gqa": "tiny_vqa", "mha": "tiny_mha_vqa", "mistral": "tiny_mistral_vqa", "qwen2": "tiny_qwen2_vqa",
            "gemma": "tiny_gemma_vqa", "next": "tiny_next_vqa", "onevision": "tiny_onevision_vqa",
            "qwen2vl": "tiny_qwen2vl_vqa", "qwen25vl": "tiny_qwen25vl_vqa", "qwen3vl": "tiny_qwen3vl_vqa",
            "gemma3": "tiny_gemma3_vqa", "internvl": "tiny_internvl_vqa", "idefics3": "tiny_idefics3_vqa",
            "mistral3": "tiny_mistral3_vqa"}


@pytest.fixture(params=list(FAMILIES))
def any_vqa(request) -> VQAModel:
    """Each layout the adapters support: Llama GQA / MHA, Mistral and Qwen2 with sliding windows, Gemma,
    LLaVA-NeXT and LLaVA-OneVision tiles, Qwen2-VL, Qwen2.5-VL and Qwen3-VL (dynamic resolution, M-RoPE,
    QK-norm and DeepStack), Gemma-3 (sandwich norms, bidirectional image blocks), InternVL and Idefics3
    (tiles with the whole image last), Mistral-3 (variable-size images with row-break markers, patch merger)."""
    return request.getfixturevalue(FAMILIES[request.param])


BEYOND_LLAVA = ["gemma3", "internvl", "idefics3", "mistral3", "qwen2vl"]


@pytest.fixture(params=BEYOND_LLAVA)
def beyond_llava_vqa(request) -> VQAModel:
    """The families that are not LLaVAs (Gemma-3, InternVL, Idefics3, Mistral-3, Qwen2-VL): the methods
    that read only logits or run whole sweeps (TAM, head claims, the comparison) are checked on each."""
    return request.getfixturevalue(FAMILIES[request.param])


@contextlib.contextmanager
def one_view(vqa):
    """InternVL's processor cut to one tile while the block runs (pixel-perturbation methods refuse tiles
    riding along pixel_values' batch axis, and their baselines go through the same processor); a no-op
    for the other families."""
    processor = vqa.processor.image_processor
    if type(vqa.model).__name__ != "InternVLForConditionalGeneration":
        yield
        return
    saved = processor.max_patches
    processor.max_patches = 1
    try:
        yield
    finally:
        processor.max_patches = saved


@pytest.fixture(scope="session")
def image():
    from PIL import Image

    rng = np.random.RandomState(0)
    return Image.fromarray((rng.rand(40, 48, 3) * 255).astype("uint8"))


@pytest.fixture(scope="session")
def wide_image():
    """70 x 40 noise: several tiles for InternVL and Idefics3, a non-square token grid for Mistral-3 and Qwen-VL."""
    from PIL import Image

    rng = np.random.RandomState(1)
    return Image.fromarray((rng.rand(40, 70, 3) * 255).astype("uint8"))


@pytest.fixture
def prepared(tiny_vqa, image):
    return tiny_vqa.prepare(image, QUESTION, ANSWER)


def write_dataset(folder: Path, n: int) -> Path:
    """``folder/data.jsonl`` with ``n`` seeded random 48 x 40 images (``folder/<i>.png``), the test question and
    answer and one box each; returns the JSONL's path."""
    import json

    from PIL import Image

    rows = []
    for index in range(n):
        Image.fromarray((np.random.RandomState(index).rand(40, 48, 3) * 255).astype("uint8")).save(
            folder / f"{index}.png")
        rows.append({"image": f"{index}.png", "question": QUESTION, "answer": ANSWER, "box": [0, 0, 24, 20]})
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def hook_snapshot(model) -> dict:
    """Every hook on every module, by module name (HF installs some of its own on first forward)."""
    out = {}
    for name, module in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            hooks = getattr(module, kind, {})
            if hooks:
                out[(name, kind)] = tuple(hooks.keys())
    return out


def model_state(model) -> dict:
    """Everything a method must leave as it found it."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": {n: m.training for n, m in model.named_modules()},
        "attn": model.config._attn_implementation,
        "text_attn": model.config.text_config._attn_implementation,
        "vision_attn": model.config.vision_config._attn_implementation,
    }


def assert_same_state(before: dict, after: dict) -> None:
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert (before["attn"], before["text_attn"], before["vision_attn"]) == (
        after["attn"], after["text_attn"], after["vision_attn"])
    for name, value in before["params"].items():
        assert torch.equal(value, after["params"][name]), name


ORGANISM_READY = (Path(__file__).resolve().parents[1] / "data" / "organism" / "config.json").exists()


@pytest.fixture(scope="session")
def organism_vqa() -> VQAModel:
    """The trained model organism shipped in data/organism."""
    if not ORGANISM_READY:
        pytest.skip("data/organism has no trained checkpoint yet")
    return VQAModel.organism()


@pytest.fixture(scope="session")
def organism_eval_items() -> list[dict]:
    """The shipped evaluation split data/eval: rows with the image opened (RGB) under ``"picture"``."""
    import json

    from PIL import Image

    from mech_vqa.organism import EVAL_DIR

    rows = [json.loads(line) for line in (EVAL_DIR / "items.jsonl").read_text().splitlines() if line.strip()]
    for row in rows:
        with Image.open(EVAL_DIR / row["image"]) as handle:
            row["picture"] = handle.convert("RGB")
    return rows


@contextlib.contextmanager
def head_zeroed_by_hand(vqa, layer: int, head: int):
    """A plain PyTorch pre-hook on o_proj zeroing one head's slice: the reference for head ablation."""
    adapter = vqa.adapter

    def hook(module, args):
        z = args[0].clone()
        z[..., head * adapter.head_dim:(head + 1) * adapter.head_dim] = 0
        return (z,)

    handle = adapter.o_proj(layer).register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def text_model(model):
    """The decoder stack, at the path transformers 5 gives each family (Idefics3 / SmolVLM: ``text_model``)."""
    inner = model.model
    return inner.language_model if hasattr(inner, "language_model") else inner.text_model


def post_norm_factor(vqa, layer: int, block: str, raw: torch.Tensor) -> torch.Tensor:
    """Elementwise ``gain * frozen scale`` (float64) that the model's own post-norm applies to a block's raw
    output ``raw`` ``[..., d]`` (``o_proj`` / ``down_proj`` output), read off the module by running it;
    ones for pre-norm layers (LLaVA), which add ``raw`` as it is."""
    decoder = text_model(vqa.model).layers[layer]
    name = {"attn": "post_attention_layernorm", "mlp": "post_feedforward_layernorm"}[block]
    if not hasattr(decoder, "post_feedforward_layernorm"):
        return torch.ones_like(raw, dtype=torch.float64)
    with torch.no_grad():
        return getattr(decoder, name)(raw).double() / raw.double()


def image_blocks(inp) -> torch.Tensor | None:
    """``[S]`` id of the image block (bidirectional under Gemma-3's mask) of each position, -1 for text,
    from the processor's ``token_type_ids`` (not the adapter); None without them."""
    marks = inp.extra.get("token_type_ids")
    if marks is None:
        return None
    is_image = marks[0] == 1
    starts = is_image & ~torch.cat([torch.zeros(1, dtype=torch.bool), is_image[:-1]])
    return torch.where(is_image, starts.long().cumsum(0) - 1, -1)


def first_view_positions(vqa, inp) -> torch.Tensor:
    """Sequence positions of the first view's image tokens, read from the input ids alone: the first
    ``rows x cols`` image tokens, row-major (CLS dropped; LLaVA-NeXT / OneVision tiles come after), or
    the last ones where the whole image follows its tiles; Qwen-VL's grid depends on the image: every
    image token."""
    found = (inp.input_ids[0] == vqa.adapter.image_token_id).nonzero().flatten()
    if vqa.adapter.patch_grid is None:
        return found
    rows, cols = vqa.adapter.patch_grid
    # InternVL's thumbnail and Idefics3's global image (the whole image) follow their tiles
    whole_last = type(vqa.model).__name__ in ("InternVLForConditionalGeneration", "Idefics3ForConditionalGeneration",
                                              "SmolVLMForConditionalGeneration")
    return found[-rows * cols:] if whole_last else found[: rows * cols]


def image_grid(vqa, inp) -> tuple[int, int]:
    """The first view's token grid: the adapter's fixed one, or (Qwen-VL) the image's."""
    return vqa.adapter.patch_grid or inp.geometry.grid


def assert_leaves_model_as_found(vqa, prepared, run):
    """``run(inp)`` leaves parameters, mode, attention implementation and hooks as found, also when a
    broken input (pixels cut) makes the forward fail. Returns ``(run(prepared), state before)``."""
    model = vqa.model
    vqa.logits(prepared)  # HF installs its own output-capture hooks on a model's first forward
    before, hooks = model_state(model), hook_snapshot(model)
    result = run(prepared)
    assert_same_state(before, model_state(model))
    assert hook_snapshot(model) == hooks
    pixels = prepared.pixel_values
    # images cut to 16 x 16 pixels; flattened patches (Qwen-VL) cut by four patches
    broken = dataclasses.replace(prepared, pixel_values=pixels[:, :-4] if pixels.dim() == 3 else pixels[:, :, :16, :16])
    with pytest.raises(Exception):  # noqa: B017 - any failure inside the forward
        run(broken)
    assert_same_state(before, model_state(model))
    assert hook_snapshot(model) == hooks
    return result, before


@pytest.fixture(scope="session")
def chromium():
    """A real headless Chromium driven by selenium (tests/explorer/explorer_browser.py); skips, naming
    what is missing, only where Debian's chromium / chromium-driver or selenium are not installed."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent / "explorer"))
    import explorer_browser

    try:
        driver = explorer_browser.start()
    except explorer_browser.BrowserMissing as err:
        pytest.skip(f"browser tests need a headless Chromium: {err}")
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="session")
def organism_answer(organism_vqa, organism_eval_items):
    """The organism's first evaluation item prepared with its greedy answer, and its box on the model's pixels."""
    item = organism_eval_items[0]
    inp = organism_vqa.prepare(item["picture"], item["question"])
    return inp, inp.box_to_model(item["box"])
