import contextlib

import pytest
import torch
from conftest import (
    assert_same_state,
    first_view_positions,
    hook_snapshot,
    image_blocks,
    model_state,
    post_norm_factor,
)

from mech_vqa import CaptureError, attention_rows
from mech_vqa.capture import _Tapped

ALL = ["resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z", "q", "k", "v", "pattern", "mlp_act",
       "vision_features", "projector_out"]


@pytest.fixture
def inp(any_vqa, image):
    return any_vqa.prepare(image, "What is the color of the dog?", "The dog is red.")


@torch.no_grad()
def test_exact_decompositions(any_vqa, inp):
    a = any_vqa.adapter
    with any_vqa.trace(ALL) as cache:
        logits = any_vqa.forward(inp).logits
    for layer in range(a.n_layers):
        pre, attn, mlp, post = (cache[n, layer] for n in ("resid_pre", "attn_out", "mlp_out", "resid_post"))
        torch.testing.assert_close(pre + attn + mlp, post, rtol=0, atol=1e-6)
        torch.testing.assert_close(pre + attn, cache["resid_mid", layer], rtol=0, atol=1e-6)
        z = cache["z", layer]
        raw = a.o_proj(layer)(z.flatten(-2))
        # Gemma-3's post-norm, its scale frozen at the forward's value (ones for pre-norm layers):
        # each head's term, raw_j * factor, is linear and the terms sum to the block output
        factor = post_norm_factor(any_vqa, layer, "attn", raw).float()
        torch.testing.assert_close(raw * factor, attn)
        per_head = torch.einsum("bshd,hdm->bshm", z, a.W_O(layer))
        bias = a.b_O(layer) if a.b_O(layer) is not None else 0
        torch.testing.assert_close((per_head.sum(2) + bias) * factor, attn, rtol=1e-5, atol=1e-6)
        raw_mlp = a.down_proj(layer)(cache["mlp_act", layer])
        torch.testing.assert_close(raw_mlp * post_norm_factor(any_vqa, layer, "mlp", raw_mlp).float(), mlp)
        pattern = cache["pattern", layer]
        torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))
        blocks = image_blocks(inp)
        above = pattern.triu(1).abs()[0].amax(0)  # [S, S] largest weight of any head on a later key
        if blocks is None:
            assert above.max() == 0  # causal
        else:  # Gemma-3: later keys are seen only within the query's own image
            same = (blocks[:, None] == blocks[None, :]) & (blocks[:, None] >= 0)
            assert above[~same].max() == 0 and above[same].max() > 0
        # attention rows recomputed from rotated q, k equal the eager weights
        rows = attention_rows(a, layer, cache["q", layer], cache["k", layer], torch.arange(inp.seq_len),
                              blocks=a.attention_blocks(inp.input_ids[0]))
        torch.testing.assert_close(rows, pattern.float(), rtol=1e-5, atol=1e-6)
        # values through the pattern give z back (GQA: values repeated per group)
        v = cache["v", layer].repeat_interleave(a.n_heads // a.n_kv_heads, dim=2)
        torch.testing.assert_close(torch.einsum("bhps,bshd->bphd", pattern, v), z, rtol=1e-5, atol=1e-6)
    last = cache["resid_post", a.n_layers - 1]
    torch.testing.assert_close(a.unembed(a.final_norm(last)), logits)
    # the first view's projector rows are the first image tokens, in order (LLaVA-NeXT: tiles follow)
    whole = -1 if first_view_positions(any_vqa, inp)[-1] == (inp.input_ids[0] == a.image_token_id).nonzero().max() else 0
    torch.testing.assert_close(cache["projector_out"][whole], cache["resid_pre", 0][0, first_view_positions(any_vqa, inp)])


@torch.no_grad()
def test_capture_does_not_change_logits(any_vqa, inp):
    plain = any_vqa.logits(inp)
    with any_vqa.trace(["resid_pre", "attn_out", "mlp_out", "z", "q", "k", "v"], positions=[inp.seq_len - 2]):
        traced = any_vqa.forward(inp).logits
    assert torch.equal(plain, traced)


@torch.no_grad()
def test_positions_and_cpu(tiny_vqa, prepared):
    t = prepared.target(3).position
    with tiny_vqa.trace(["z", "resid_pre", "v", "pattern"], positions=[t], layers=[1], to_cpu=True) as small:
        tiny_vqa.forward(prepared)
    with tiny_vqa.trace(["z", "resid_pre", "v", "pattern"], layers=[1]) as full:
        tiny_vqa.forward(prepared)
    assert small["z", 1].shape == (1, 1, 4, 16)
    torch.testing.assert_close(small["z", 1], full["z", 1][:, [t]])
    torch.testing.assert_close(small["pattern", 1], full["pattern", 1][:, :, [t]])
    assert small["v", 1].shape == full["v", 1].shape  # values keep every source position
    assert ("z", 0) not in small
    with pytest.raises(KeyError, match="was not captured"):
        small["z", 0]


@torch.no_grad()
def test_per_row_positions(tiny_vqa, prepared):
    with tiny_vqa.trace(["resid_pre"], layers=[0], positions=torch.tensor([[3, 7]])) as cache:
        tiny_vqa.forward(prepared)
    with tiny_vqa.trace(["resid_pre"], layers=[0]) as full:
        tiny_vqa.forward(prepared)
    torch.testing.assert_close(cache["resid_pre", 0], full["resid_pre", 0][:, [3, 7]])


def test_hooks_removed_and_state_restored_even_on_error(tiny_vqa, prepared):
    model = tiny_vqa.model
    tiny_vqa.logits(prepared)  # HF installs its own output hooks on first forward
    hooks, state = hook_snapshot(model), model_state(model)
    with pytest.raises(RuntimeError, match="boom"):
        with tiny_vqa.trace(ALL):
            tiny_vqa.forward(prepared)
            raise RuntimeError("boom")
    assert hook_snapshot(model) == hooks
    assert_same_state(state, model_state(model))
    assert model.config._attn_implementation == "sdpa"


def test_bad_requests(tiny_vqa, prepared):
    with pytest.raises(ValueError, match="unknown activation names"):
        with tiny_vqa.trace(["residual"]):
            pass
    with pytest.raises(IndexError, match="outside the sequence"):
        with tiny_vqa.trace(["resid_pre"], positions=[999]):
            tiny_vqa.forward(prepared)


def test_pattern_from_a_model_that_cannot_give_it(tiny_vqa, prepared, monkeypatch):
    """A model whose attention never returns weights (as sdpa or flash would) is one clear error."""
    attn = tiny_vqa.adapter.attn(0)
    original = type(attn).forward

    def no_weights(self, *args, **kwargs):
        out, _ = original(self, *args, **kwargs)
        return out, None

    monkeypatch.setattr(type(attn), "forward", no_weights)
    with pytest.raises(CaptureError, match="cannot give attention patterns"):
        with tiny_vqa.trace(["pattern"]):
            tiny_vqa.forward(prepared)


def test_queries_at_positions_equal_the_full_capture_with_multi_head_attention(tiny_mha_vqa, prepared):
    """Multi-head attention rotates the chosen queries as extra rows of the keys (one call): the same
    values as rotating everything."""
    with torch.no_grad(), tiny_mha_vqa.trace(["q", "k"], positions=[5, 20]) as chosen:
        tiny_mha_vqa.forward(prepared)
    with torch.no_grad(), tiny_mha_vqa.trace(["q", "k"]) as full:
        tiny_mha_vqa.forward(prepared)
    for layer in range(tiny_mha_vqa.adapter.n_layers):
        torch.testing.assert_close(chosen["q", layer], full["q", layer][:, [5, 20]], rtol=0, atol=0)
        torch.testing.assert_close(chosen["k", layer], full["k", layer], rtol=0, atol=0)


@contextlib.contextmanager
def eager_attention(vqa):
    """The model in eager attention for the block (a capture's attention taps then do not run: q / k / v
    are projected from the attention input at the first read); sdpa again afterwards."""
    before = vqa.model.config.text_config._attn_implementation
    vqa.model.set_attn_implementation("eager")
    try:
        yield
    finally:
        vqa.model.set_attn_implementation(before)


def _nothing_to_project(cache) -> bool:
    """Whether a capture's queries, keys and values came from its attention taps: nothing is left to project
    or rotate at the first read, only views to lay out."""
    return all(isinstance(job, _Tapped) for job in cache.pending.values())


@torch.no_grad()
@pytest.mark.parametrize("route", ["tapped", "projected"])
def test_tapped_or_projected_at_read_equals_captured_by_hooks(any_vqa, inp, route):
    """Where keys or values are kept, q/k/v come from the attention function's own inputs under sdpa (its
    tap), else they are projected from the attention input at the first read (all layers together, or one
    layer on its own); ``to_cpu`` records them with hooks on the projections in the forward. All give the
    same bits. Editing the projection weights before a projected read is one clear error; tapped values
    were recorded in the forward, so the same edit changes nothing."""
    positions = [inp.seq_len - 1]
    with contextlib.ExitStack() as stack:
        if route == "projected":
            stack.enter_context(eager_attention(any_vqa))
        with any_vqa.trace(["q", "k", "v"], positions=positions, to_cpu=True) as hooked:
            any_vqa.forward(inp)
        with any_vqa.trace(["q", "k", "v"], positions=positions) as every_layer:
            any_vqa.forward(inp)
        assert _nothing_to_project(every_layer) == (route == "tapped")
        every_layer.keys()  # everything at once
        for layer in range(any_vqa.adapter.n_layers):
            with any_vqa.trace(["q", "k", "v"], positions=positions) as one_layer:
                any_vqa.forward(inp)
            for name in ("k", "v", "q"):  # keys first: the one-layer path
                expected = hooked[name, layer]
                torch.testing.assert_close(one_layer[name, layer].cpu(), expected, rtol=0, atol=0)
                torch.testing.assert_close(every_layer[name, layer].cpu(), expected, rtol=0, atol=0)
        with any_vqa.trace(["k"]) as edited:
            any_vqa.forward(inp)
        weight = any_vqa.adapter.k_proj(0).weight
        weight.add_(0.0)  # an in-place edit (same values, new version)
        if route == "projected":
            with pytest.raises(CaptureError, match="weights changed after the forward"):
                edited["k", 0]
        else:
            torch.testing.assert_close(edited["k", 0].cpu(), hooked["k", 0], rtol=0, atol=0)
    assert any_vqa.model.config.text_config._attn_implementation == "sdpa"


def test_attention_taps_leave_nothing_behind(tiny_vqa, prepared):
    """A capture selects its tapping attention on the text config for its forward only, and removes its
    taps: afterwards (an exception included) the config selects sdpa again and no tap is registered."""
    from mech_vqa import hooks

    config = tiny_vqa.model.config.text_config
    seen = []
    handle = tiny_vqa.adapter.layer(0).register_forward_pre_hook(
        lambda module, args: seen.append(config._attn_implementation))
    try:
        for _ in range(3):  # set up, kept, reused
            with tiny_vqa.trace(["k", "v"]) as cache:
                tiny_vqa.forward(prepared)
            assert _nothing_to_project(cache) and ("k", 0) in cache
        with pytest.raises(RuntimeError, match="inside the block"), tiny_vqa.trace(["k", "v"]):
            tiny_vqa.forward(prepared)
            raise RuntimeError("inside the block")
    finally:
        handle.remove()
    assert seen == [hooks.TAP_ATTENTION] * 4
    assert config._attn_implementation == "sdpa" and not hooks._ATTENTION_TAPS
    with tiny_vqa.trace(["k"]) as outer, tiny_vqa.trace(["v"]) as inner:  # nested: both tapped
        tiny_vqa.forward(prepared)
    assert _nothing_to_project(outer) and _nothing_to_project(inner) and ("k", 1) in outer and ("v", 1) in inner
    assert config._attn_implementation == "sdpa" and not hooks._ATTENTION_TAPS


@torch.no_grad()
def test_z_read_by_the_attention_tap_is_o_projs_input(any_vqa, inp):
    """With keys or values kept under sdpa, ``z`` comes from the attention function's output (no hook on
    o_proj): the same bits as o_proj's input, read by the hook a capture of ``z`` alone installs."""
    from mech_vqa import hooks

    positions = [3, inp.seq_len - 1]
    with any_vqa.trace(["z"], positions=positions) as hooked:
        any_vqa.forward(inp)
    seen = []
    with any_vqa.trace(["z", "v"], positions=positions) as tapped:
        seen.extend(len(any_vqa.adapter.o_proj(i)._forward_pre_hooks) for i in range(any_vqa.adapter.n_layers))
        any_vqa.forward(inp)
    assert seen == [0] * any_vqa.adapter.n_layers and not hooks._ATTENTION_TAPS
    for layer in range(any_vqa.adapter.n_layers):
        torch.testing.assert_close(tapped["z", layer], hooked["z", layer], rtol=0, atol=0)


@torch.no_grad()
def test_z_is_read_where_edits_and_other_hooks_act(tiny_vqa, prepared):
    """An intervention on z in the same trace, or another pre-hook on o_proj, changes o_proj's input after
    the attention returned: such captures read z with a hook on o_proj, and see the edit."""
    from mech_vqa.interventions import zero_head

    t = prepared.seq_len - 1
    with tiny_vqa.trace(["z", "k"], positions=[t], interventions=[zero_head(1, 2)]) as edited:
        tiny_vqa.forward(prepared)
    assert edited["z", 1][0, 0, 2].abs().max() == 0 and edited["z", 1][0, 0, 3].abs().max() > 0
    o_proj = tiny_vqa.adapter.o_proj(0)

    def halve(module, args):
        return (args[0] * 0.5,)

    with tiny_vqa.trace(["z", "k"], positions=[t]) as clean:
        tiny_vqa.forward(prepared)
    handle = o_proj.register_forward_pre_hook(halve)
    try:
        for _ in range(3):  # also once the set is kept: it is not used with the new hook there
            with tiny_vqa.trace(["z", "k"], positions=[t]) as halved:
                tiny_vqa.forward(prepared)
            torch.testing.assert_close(halved["z", 0], clean["z", 0] * 0.5, rtol=0, atol=0)
    finally:
        handle.remove()


def test_switching_attention_inside_a_trace_that_reads_z_from_the_tap_is_one_clear_error(tiny_vqa, prepared):
    with pytest.raises(CaptureError, match="select it before the trace"), torch.no_grad(), \
            tiny_vqa.trace(["z", "k"]):
        tiny_vqa.model.set_attn_implementation("eager")
        try:
            tiny_vqa.forward(prepared)
        finally:
            tiny_vqa.model.set_attn_implementation("sdpa")
    assert tiny_vqa.model.config.text_config._attn_implementation == "sdpa"


def test_a_kept_set_follows_the_attention_selected_when_it_is_asked_for(tiny_vqa, prepared):
    """A capture set kept from sdpa forwards, asked for after the model switched to eager attention: its
    taps would not run (the config is left as the user set it), so q / k / v are projected at the read and
    z is read from o_proj's input instead, by a set made for eager attention. Once sdpa is selected again,
    that set is not reused: the next is tapped again."""
    for _ in range(3):
        with tiny_vqa.trace(["q", "k", "v", "z"], positions=[4]) as tapped:
            tiny_vqa.forward(prepared)
    with eager_attention(tiny_vqa):
        for _ in range(3):
            with tiny_vqa.trace(["q", "k", "v", "z"], positions=[4]) as projected:
                tiny_vqa.forward(prepared)
        assert tiny_vqa.model.config.text_config._attn_implementation == "eager"
        assert not _nothing_to_project(projected)
        for layer in range(tiny_vqa.adapter.n_layers):
            for name in ("q", "k", "v", "z"):
                torch.testing.assert_close(projected[name, layer], tapped[name, layer], rtol=1e-6, atol=1e-6)
    for _ in range(2):
        with tiny_vqa.trace(["q", "k", "v", "z"], positions=[4]) as again:
            tiny_vqa.forward(prepared)
        assert _nothing_to_project(again)


# ----------------------------------------------------------------------------- keep_hooks
def _explanation_numbers(explanation):
    return (explanation.layers.attention, explanation.layers.mlp, explanation.heads.scores,
            explanation.positions.scores, explanation.patch_map.scores)


def test_keep_hooks_reuses_one_set_of_hooks_and_changes_no_result(tiny_mha_vqa, image):
    from mech_vqa.methods.mechanistic import explain

    vqa, model = tiny_mha_vqa, tiny_mha_vqa.model
    vqa.logits(vqa.prepare(image, "What is the color of the dog?"))  # HF's own hooks, installed on first forward
    before, state = hook_snapshot(model), model_state(model)
    items = [vqa.prepare(image, "What is the color of the dog?", "The dog is red."),
             vqa.prepare(image.rotate(90), "What is the shape?", "A circle.")]
    fresh = [explain(vqa, item, progress=False) for item in items]
    with vqa.keep_hooks():
        kept = [explain(vqa, items[0], progress=False)]
        installed = hook_snapshot(model)
        assert installed != before  # the capture's hooks stay between calls
        kept += [explain(vqa, item, progress=False) for item in items[1:]]
        assert hook_snapshot(model) == installed  # ... and the next call reuses them (no new handles)
        assert torch.equal(vqa.logits(items[0]), vqa.logits(items[0]))  # idle hooks change no forward
    assert hook_snapshot(model) == before
    assert_same_state(state, model_state(model))
    for ours, reference in zip(kept, fresh):
        for a, b in zip(_explanation_numbers(ours), _explanation_numbers(reference)):
            assert torch.equal(a, b)


@torch.no_grad()
def test_keep_hooks_rotates_each_capture_into_its_own_cache(tiny_mha_vqa, image):
    """Queries and keys are projected and rotated when first read, which may be after the next call
    reused the hooks: each capture's must land in its own cache."""
    vqa = tiny_mha_vqa
    first, second = (vqa.prepare(image, "What is the color of the dog?", "The dog is red."),
                     vqa.prepare(image.rotate(90), "What is the color of the dog?", "The dog is red."))
    names = ["q", "k", "v", "resid_pre"]
    with vqa.trace(names, positions=[5]) as expected:
        vqa.forward(first)
    with vqa.keep_hooks():
        with vqa.trace(names, positions=[5]) as cache_first:
            vqa.forward(first)
        with vqa.trace(names, positions=[5]) as cache_second:
            vqa.forward(second)
        for layer in range(vqa.adapter.n_layers):  # read only now, after the second forward
            for name in names:
                assert torch.equal(cache_first[name, layer], expected[name, layer])
                assert not torch.equal(cache_second[name, layer], expected[name, layer])


@torch.no_grad()
def test_keep_hooks_nested_edited_and_failing_captures(tiny_vqa, prepared):
    from mech_vqa.interventions import Intervention

    vqa, model = tiny_vqa, tiny_vqa.model
    vqa.logits(prepared)
    before = hook_snapshot(model)
    with vqa.trace(["attn_out"]) as plain:
        vqa.forward(prepared)
    edit = Intervention("resid_pre", 1, mode="zero")
    with vqa.trace(["attn_out"], interventions=[edit]) as edited:
        vqa.forward(prepared)
    with pytest.raises(RuntimeError, match="boom"), vqa.keep_hooks():
        with vqa.trace(["attn_out"]) as outer, vqa.trace(["attn_out"]) as inner:  # same plan, nested: both filled
            vqa.forward(prepared)
        # an edited capture installs its own hooks after the edit's: it sees the edited values
        with vqa.trace(["attn_out"], interventions=[edit]) as kept_edited:
            vqa.forward(prepared)
        with vqa.trace(["attn_out"]) as again:
            vqa.forward(prepared)
        with vqa.trace(["attn_out"]):
            vqa.forward(prepared)
            raise RuntimeError("boom")
    assert hook_snapshot(model) == before  # removed, the error included
    for layer in range(vqa.adapter.n_layers):
        for cache in (outer, inner, again):
            assert torch.equal(cache["attn_out", layer], plain["attn_out", layer])
        assert torch.equal(kept_edited["attn_out", layer], edited["attn_out", layer])
    assert not torch.equal(edited["attn_out", 1], plain["attn_out", 1])


# ----------------------------------------------------------------- capture sets kept between calls
def _own_copy(vqa):
    """A model of its own, for a test that edits the model."""
    import copy

    from mech_vqa import VQAModel

    return VQAModel(copy.deepcopy(vqa.model), vqa.processor, name=vqa.name)


def _fresh(vqa, names, inp, **kwargs):
    """The same capture set up from scratch (a new adapter keeps nothing)."""
    from mech_vqa.capture import trace

    with trace(vqa.model, None, names, **kwargs) as cache, torch.no_grad():
        vqa.forward(inp)
    return cache


@torch.no_grad()
def test_a_capture_set_up_twice_is_kept_and_used_again_without_leaving_hooks(tiny_mha_vqa, image):
    """A capture asked for a second time keeps its set-up (a capture asked for once does not pay for
    keeping it); the third uses it: same numbers, and the hooks are on the model only during each call."""
    vqa = _own_copy(tiny_mha_vqa)
    model = vqa.model
    inp = vqa.prepare(image, "What is the color of the dog?", "The dog is red.")
    vqa.logits(inp)
    before = hook_snapshot(model)
    names = ["resid_pre", "attn_out", "z", "q", "k", "v"]
    fresh = _fresh(vqa, names, inp, positions=[4])
    kept = []
    for _ in range(3):
        with vqa.trace(names, positions=[4]) as cache:
            assert hook_snapshot(model) != before  # installed for the call ...
            vqa.forward(inp)
        assert hook_snapshot(model) == before  # ... and only for the call
        kept.append(list(vqa.adapter.__dict__.get("_capture_sets", {}).values()))
        for layer in range(vqa.adapter.n_layers):
            for name in names:
                assert torch.equal(cache[name, layer], fresh[name, layer])
    assert kept[0] == [] and len(kept[1]) == 1 and kept[2][0] is kept[1][0]


@torch.no_grad()
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_a_kept_capture_set_follows_swapped_modules_new_hooks_and_changed_layers(tiny_mha_vqa, image, attention):
    """A kept set is used again only on the model it was made for: a swapped module, a removed or added
    layer sets up anew; a hook that edits a projection is seen as a fresh capture sees it (under sdpa the
    attention's tap reads what the attention reads; else q / k / v are captured by hooks, not recomputed)."""
    vqa = _own_copy(tiny_mha_vqa)
    vqa.model.set_attn_implementation(attention)
    a = vqa.adapter
    inp = vqa.prepare(image, "What is the color of the dog?", "The dog is red.")
    names = ["resid_pre", "attn_out", "z", "k"]

    def captured():
        with vqa.trace(names) as cache:
            vqa.forward(inp)
        return cache

    def assert_as_fresh(cache):
        fresh = _fresh(vqa, names, inp)
        assert sorted(cache.keys()) == sorted(fresh.keys())
        for key in sorted(fresh.keys()):
            assert torch.equal(cache[key], fresh[key]), key

    captured(), captured()  # kept from the second call on
    swapped = torch.nn.Linear(a.o_proj(1).in_features, a.o_proj(1).out_features, bias=False)
    torch.nn.init.normal_(swapped.weight)
    a.attn(1).o_proj = swapped
    cache = captured()
    assert_as_fresh(cache)
    torch.testing.assert_close(swapped(cache["z", 1].flatten(-2)), cache["attn_out", 1])

    handle = a.k_proj(0).register_forward_hook(lambda module, args, out: out * 2)
    try:
        assert_as_fresh(captured())
    finally:
        handle.remove()

    removed = a.layer(2)
    del a.layers[2]
    cache = captured()
    assert_as_fresh(cache)
    assert {layer for _, layer in sorted(cache.keys())} == {0, 1}
    a.layers.append(removed)  # a layer added: the set made for two layers no longer holds
    cache = captured()
    assert_as_fresh(cache)
    assert {layer for _, layer in sorted(cache.keys())} == {0, 1, 2}


@torch.no_grad()
def test_a_capture_set_up_that_failed_halfway_is_not_kept(tiny_mha_vqa, image, monkeypatch):
    """An error while the hooks are being set up leaves nothing on the model and nothing kept: the next
    capture of that kind records every layer."""
    from mech_vqa import capture

    vqa = _own_copy(tiny_mha_vqa)
    inp = vqa.prepare(image, "What is the color of the dog?", "The dog is red.")
    before = hook_snapshot(vqa.model)
    register_layer = capture._register_layer

    def failing_at_layer_1(installed, adapter, layer, *args, **kwargs):
        if layer == 1:
            raise RuntimeError("set-up failed")
        return register_layer(installed, adapter, layer, *args, **kwargs)

    monkeypatch.setattr(capture, "_register_layer", failing_at_layer_1)
    for _ in range(2):  # a second failure would be the capture's second call of its kind
        with pytest.raises(RuntimeError, match="set-up failed"), vqa.trace(["resid_pre"]):
            pass
        assert hook_snapshot(vqa.model) == before
    monkeypatch.setattr(capture, "_register_layer", register_layer)
    with vqa.trace(["resid_pre"]) as cache:
        vqa.forward(inp)
    assert sorted(cache.keys()) == [("resid_pre", layer) for layer in range(vqa.adapter.n_layers)]


def test_hookset_hooks_run_with_kwargs_in_order_and_leave_nothing_behind():
    """HookSet writes its hooks into the module's own dictionaries (no handle objects): they run with the
    call's kwargs, in registration order among torch's own hooks, under ids torch's handles never reuse,
    and removal leaves exactly what was there before."""
    from mech_vqa.hooks import HookSet

    module, seen = torch.nn.Linear(2, 2), []
    earlier = module.register_forward_hook(lambda m, args, out: seen.append("torch, earlier"))
    dictionaries = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs")
    before = {name: dict(getattr(module, name)) for name in dictionaries}
    hooks = HookSet()
    hooks.pre(module, lambda m, args, kwargs: seen.append(("pre", sorted(kwargs))))
    hooks.post(module, lambda m, args, kwargs, out: seen.append(("post", sorted(kwargs), out.shape)))
    later = module.register_forward_hook(lambda m, args, out: seen.append("torch, later"))
    module(input=torch.ones(1, 2))
    assert seen == [("pre", ["input"]), "torch, earlier", ("post", ["input"], (1, 2)), "torch, later"]
    ids = [hook_id for hook_id in module._forward_hooks]
    assert len(set(ids)) == 3 and earlier.id < ids[1] < later.id
    later.remove()
    hooks.remove()
    assert {name: dict(getattr(module, name)) for name in dictionaries} == before
    seen.clear()
    module(torch.ones(1, 2))
    assert seen == ["torch, earlier"]
    # put back after removal: the same hooks, in order, after those registered meanwhile, under new ids
    meanwhile = module.register_forward_hook(lambda m, args, out: seen.append("torch, meanwhile"))
    hooks.install()
    with pytest.raises(RuntimeError, match="still installed"):
        hooks.install()
    seen.clear()
    module(input=torch.ones(1, 2))
    assert seen == [("pre", ["input"]), "torch, earlier", "torch, meanwhile", ("post", ["input"], (1, 2))]
    assert max(module._forward_hooks) > meanwhile.id
    hooks.remove()
    meanwhile.remove()
    assert {name: dict(getattr(module, name)) for name in dictionaries} == before


def test_layers_given_as_iterators_are_read_once(tiny_vqa, prepared):
    """``layers`` (a list or ``{name: layers}``) may hold iterators: each is read once, in and out of
    keep_hooks, and the same layers are recorded as with lists."""
    for keeping in (False, True):
        with tiny_vqa.keep_hooks() if keeping else torch.no_grad():
            with tiny_vqa.trace(["resid_pre", "attn_out"], layers={"resid_pre": iter([0, -1]), "attn_out": (i for i in [1])}) \
                    as cache, torch.no_grad():
                tiny_vqa.forward(prepared)
            assert sorted(cache.keys()) == [("attn_out", 1), ("resid_pre", 0), ("resid_pre", 1)]
            with tiny_vqa.trace(["resid_pre"], layers=iter([1])) as cache, torch.no_grad():
                tiny_vqa.forward(prepared)
            assert list(cache.keys()) == [("resid_pre", 1)]
