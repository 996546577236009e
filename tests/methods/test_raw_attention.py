import copy

import matplotlib
import pytest
import torch

from conftest import ANSWER, QUESTION, assert_leaves_model_as_found, first_view_positions, image_grid
from mech_vqa.methods.raw_attention import answer_attention, attention_mass, patch_to_text, raw_attention_map
from mech_vqa.results import PatchMap, Result
from mech_vqa.results.attention import AnswerAttention, AttentionMass, PatchToText

matplotlib.use("Agg")


def eager_attentions(vqa, inp) -> torch.Tensor:
    """``[layers, heads, seq, seq]`` from an independent eager forward of a deep copy."""
    model = copy.deepcopy(vqa.model)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(**vqa.adapter.model_inputs(inp.model_inputs()), output_attentions=True, use_cache=False)
    return torch.stack([a[0] for a in out.attentions]).float()


def image_cells(vqa, inp):
    """The first view's image-token positions and their (row, col), from the input ids (row-major)."""
    config = vqa.model.config
    pooled = getattr(config, "mm_tokens_per_image", None)  # Gemma-3 average-pools the patches to this many tokens
    if vqa.adapter.patch_grid is None:  # Qwen-VL: the grid depends on the image
        cols = image_grid(vqa, inp)[1]
    elif pooled:
        cols = round(pooled ** 0.5)
    elif hasattr(config, "downsample_ratio"):  # InternVL: the pixel shuffle folds 2 x 2 patches per token
        cols = round(config.image_seq_length ** 0.5)
    elif hasattr(config, "scale_factor"):  # Idefics3: the connector's pixel shuffle
        cols = config.vision_config.image_size // config.vision_config.patch_size // config.scale_factor
    else:
        cols = config.vision_config.image_size // config.vision_config.patch_size
    positions = first_view_positions(vqa, inp)
    index = torch.arange(positions.numel())
    return positions, index // cols, index % cols


def on_grid(vqa, inp, values):
    positions, rows, cols = image_cells(vqa, inp)
    grid = torch.zeros(int(rows.max()) + 1, int(cols.max()) + 1)
    grid[rows, cols] = values
    return grid


@pytest.fixture
def any_prepared(any_vqa, image):
    return any_vqa.prepare(image, QUESTION, ANSWER)


def test_rows_equal_eager_weights(any_vqa, any_prepared):
    result = answer_attention(any_vqa, any_prepared)
    eager = eager_attentions(any_vqa, any_prepared)
    predicting = (any_prepared.answer_positions - 1).tolist()
    assert [t["position"] for t in result.targets] == predicting
    assert result.weights.shape == (eager.shape[0], eager.shape[1], len(predicting), any_prepared.seq_len)
    torch.testing.assert_close(result.weights, eager[:, :, predicting], rtol=0, atol=1e-6)


def test_aggregations_equal_eager(any_vqa, any_prepared):
    eager = eager_attentions(any_vqa, any_prepared)
    positions, _, _ = image_cells(any_vqa, any_prepared)
    predicting = (any_prepared.answer_positions - 1)
    image = eager[:, :, predicting][..., positions]  # [L, H, T, n_image]
    result = answer_attention(any_vqa, any_prepared)

    mean_map = result.patch_map()
    assert isinstance(mean_map, PatchMap) and mean_map.method == "raw_attention"
    torch.testing.assert_close(mean_map.scores, on_grid(any_vqa, any_prepared, image.mean((0, 1, 2))),
                               rtol=0, atol=1e-6)
    last = any_vqa.adapter.n_layers - 1
    chosen = result.patch_map(layers=range(1, last + 1), heads=[0, 2], tokens=[1, 3], head_reduce="max",
                              layer_reduce="mean", token_reduce="max")
    expected = image[1:][:, [0, 2]][:, :, [1, 3]].amax(1).mean(0).amax(0)
    torch.testing.assert_close(chosen.scores, on_grid(any_vqa, any_prepared, expected), rtol=0, atol=1e-6)
    assert [t["token"] for t in chosen.targets] == [any_prepared.str_tokens[i] for i in
                                                   any_prepared.answer_positions[[1, 3]].tolist()]
    torch.testing.assert_close(result.head_maps(last, tokens=[0])[2],
                               on_grid(any_vqa, any_prepared, image[last, 2, 0]), rtol=0, atol=1e-6)
    single = raw_attention_map(any_vqa, any_prepared, 2, layers=[0], heads=[1])
    torch.testing.assert_close(single.scores, on_grid(any_vqa, any_prepared, image[0, 1, 2]), rtol=0, atol=1e-6)


def test_gemma3_image_rows_see_their_whole_image_as_eager_does(tiny_gemma3_vqa, image):
    """Gemma-3's image tokens attend to every token of their image, later ones included: attention rows
    (and their maps) asked at image positions equal the eager weights there, which a causal rebuild
    (the image blocks dropped) would cut at the query."""
    vqa = tiny_gemma3_vqa
    inp = vqa.prepare(image, QUESTION, ANSWER)
    positions = inp.geometry.positions
    queries = [int(positions[0]), int(positions[5]), int(positions[-2])]
    result = answer_attention(vqa, inp, [inp.target(position=p) for p in queries])
    eager = eager_attentions(vqa, inp)[:, :, queries]                          # [L, H, 3, S]
    later = positions[None, :] > torch.tensor(queries)[:, None]                # [3, n_image]
    assert float(eager[..., positions].mul(later).sum(-1).min()) > 0           # every head reads later patches
    torch.testing.assert_close(result.weights, eager, rtol=0, atol=1e-6)
    patch_map = raw_attention_map(vqa, inp, [inp.target(position=queries[0])], layers=[1], heads=[0])
    torch.testing.assert_close(patch_map.scores, on_grid(vqa, inp, eager[1, 0, 0, positions]), rtol=0, atol=1e-6)


def test_one_forward_for_all_answer_tokens(tiny_vqa, prepared):
    calls = []
    handle = tiny_vqa.model.register_forward_pre_hook(lambda *args: calls.append(1))
    try:
        answer_attention(tiny_vqa, prepared)
    finally:
        handle.remove()
    assert len(calls) == 1


def test_mass_summary_groups(tiny_vqa, prepared):
    eager = eager_attentions(tiny_vqa, prepared)
    predicting = (prepared.answer_positions - 1)
    rows = eager[:, :, predicting]  # [L, H, T, S]
    mass = attention_mass(tiny_vqa, prepared)
    assert isinstance(mass, AttentionMass) and mass.mass.shape == (2, 4, 4)
    torch.testing.assert_close(mass.mass.sum(-1), torch.ones(2, 4), rtol=0, atol=1e-5)
    image_positions, _, _ = image_cells(tiny_vqa, prepared)
    torch.testing.assert_close(mass.of("image"), rows[..., image_positions].sum(-1).mean(-1), rtol=0, atol=1e-6)
    question = list(range(int(image_positions.max()) + 1, prepared.str_tokens.index("?") + 1))  # "what ... ?"
    assert prepared.question_positions.tolist() == question
    torch.testing.assert_close(mass.of("question"), rows[..., question].sum(-1).mean(-1), rtol=0, atol=1e-6)
    answer = prepared.answer_positions.tolist()
    torch.testing.assert_close(mass.of("answer"), rows[..., answer].sum(-1).mean(-1), rtol=0, atol=1e-6)
    assert mass.topk(3).shape[0] == 3


def test_patch_to_text_reverse_view(tiny_vqa, prepared):
    eager = eager_attentions(tiny_vqa, prepared)
    predicting = (prepared.answer_positions - 1)
    positions, rows, cols = image_cells(tiny_vqa, prepared)
    cells = [(0, 1), (2, 3)]
    chosen = [int(positions[(rows == r) & (cols == c)]) for r, c in cells]
    result = patch_to_text(tiny_vqa, prepared, cells, layers=[1])
    assert isinstance(result, PatchToText)
    expected = eager[1][:, predicting][..., chosen].sum(-1).mean(0)  # heads mean, one layer
    torch.testing.assert_close(result.scores, expected, rtol=0, atol=1e-6)
    assert result.to_dataframe()["token"].tolist() == [prepared.str_tokens[i] for i in prepared.answer_positions]
    with pytest.raises(IndexError, match="outside the 4x4 patch grid"):
        patch_to_text(tiny_vqa, prepared, [(4, 0)])


def test_state_restored_and_errors(tiny_vqa, prepared):
    assert_leaves_model_as_found(tiny_vqa, prepared, lambda inp: answer_attention(tiny_vqa, inp, layers=[1]))
    with pytest.raises(IndexError, match="the answer has 5 tokens"):
        answer_attention(tiny_vqa, prepared, targets=[7])
    with pytest.raises(IndexError, match="layer 5 is out of range"):
        answer_attention(tiny_vqa, prepared, layers=[5])
    with pytest.raises(TypeError, match="PreparedInput"):
        answer_attention(tiny_vqa, tiny_vqa.batch([prepared, prepared]))
    result = answer_attention(tiny_vqa, prepared)
    with pytest.raises(ValueError, match="unknown reduction"):
        result.patch_map(head_reduce="median")
    with pytest.raises(IndexError, match="head 9 is not in this result"):
        result.patch_map(heads=[9])


def test_save_load_and_plots(tiny_vqa, prepared, tmp_path):
    result = answer_attention(tiny_vqa, prepared, box=[0, 0, 16, 16])
    path = result.save(tmp_path / "attention")
    loaded = Result.load(path)
    assert isinstance(loaded, AnswerAttention)
    torch.testing.assert_close(loaded.patch_map().scores, result.patch_map().scores)
    assert loaded.patch_map().box == [0.0, 0.0, 16.0, 16.0]
    fig, axes = result.plot(layer=0)
    assert len(axes) == 4
    for view in (result.mass(), result.patch_to_text([(0, 0)]), result.patch_map()):
        fig, ax = view.plot()
        assert fig is not None
    mass_path = result.mass().save(tmp_path / "mass")
    torch.testing.assert_close(Result.load(mass_path).mass, result.mass().mass)
    assert result.topk(5).shape[0] == 5


def _answer_word_index(inp, word: str) -> int:
    tokens = [inp.str_tokens[i] for i in inp.answer_positions.tolist()]
    return max(i for i, t in enumerate(tokens) if t == word)


def scaffolded_head(vqa):
    """(layer, head) whose attention the organism's training pulled onto the answer object, or None.

    ``mech_vqa.organism.train --attn-sup`` supervises one head's attention from the answer
    position: its localisation is by construction, so it is reported apart from the others.
    """
    import json

    from mech_vqa.organism import ORGANISM_DIR

    log = ORGANISM_DIR / "training_log.json"
    args = json.loads(log.read_text()).get("args", {}) if log.exists() else {}
    if args.get("attn_sup", 0) > 0:
        return vqa.adapter.check_layer(args.get("attn_sup_layer", 2)), args.get("attn_sup_head", 0)
    return None


def test_organism_raw_attention_localisation(organism_vqa):
    """Every question of a small set runs; localisation is measured against the answer object's box."""
    from mech_vqa.organism import generate_items

    items = generate_items(10, seed=11)
    shares, hits, uniform, per_head = [], [], [], []
    for item in items:
        inp = organism_vqa.prepare(item.image, item.question, item.answer)
        result = answer_attention(organism_vqa, inp, _answer_word_index(inp, item.answer_word), box=item.box)
        patch_map = result.patch_map()
        shares.append(patch_map.in_box_share())
        hits.append(patch_map.pointing_game())
        uniform.append(float(patch_map.inside_box().float().mean()))
        per_head.append([[result.patch_map(layers=[layer], heads=[head]).in_box_share()
                          for head in range(result.weights.shape[1])] for layer in result.layers])
    head_shares = torch.tensor(per_head).mean(0)  # [layers, heads]
    chance = sum(uniform) / len(uniform)
    scaffold = scaffolded_head(organism_vqa)
    others = torch.ones_like(head_shares, dtype=torch.bool)
    if scaffold is not None:
        others[scaffold] = False
    print(f"raw attention, mean of all heads and layers: in-box share {sum(shares) / len(shares):.3f}, pointing "
          f"game {sum(hits) / len(hits):.2f}; uniform share {chance:.3f}; scaffolded head {scaffold}")
    print(f"in-box share per (layer, head):\n{head_shares.numpy().round(3)}")
    assert all(0.0 <= s <= 1.0 for s in shares)
    if scaffold is not None:  # the supervised head must show its training target
        assert float(head_shares[scaffold]) > 2 * chance
    # Measured claim: some head that was not supervised also attends from the answer word to the
    # answer object beyond chance.
    assert float(head_shares[others].max()) > chance
