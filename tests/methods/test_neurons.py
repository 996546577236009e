"""FFN neuron attribution (Yu & Ananiadou, EMNLP 2024) against a hand computation."""

import pytest
import torch

from conftest import assert_same_state, hook_snapshot, model_state, post_norm_factor, text_model
from mech_vqa.methods.neurons import neuron_increase
from mech_vqa.results import Result


@pytest.fixture
def inp(any_vqa, image):
    return any_vqa.prepare(image, "What is the color of the dog?", "The dog is red.")


@torch.no_grad()
def test_neuron_increase_equals_hand_loop(any_vqa, inp):
    model, a = any_vqa.model, any_vqa.adapter
    target = inp.target(1)
    t = target.position
    with any_vqa.trace(["resid_pre", "attn_out", "mlp_out", "mlp_act", "resid_post"]) as c:
        any_vqa.forward(inp)
    norm = text_model(model).norm
    final = c["resid_post", a.n_layers - 1][0, t]
    # gain * frozen scale, elementwise, from the model's own norm at r (Llama: w; Gemma: 1 + w)
    gain_scale = norm(final[None])[0].double() / final.double()
    scale = 1.0 / torch.sqrt(final.double().pow(2).mean() + getattr(norm, "variance_epsilon", getattr(norm, "eps", 0)))
    gamma, W_U = gain_scale / scale, model.lm_head.weight.double()

    def lp(v):
        return float((W_U @ (gain_scale * v)).log_softmax(-1)[target.token_id])

    layers = [a.n_layers - 1, 0]
    result = neuron_increase(any_vqa, inp, target, layers=layers, k=4, n_tokens=3, progress=False)
    assert result.scores.shape == (2, a.d_mlp) and result.layers == layers
    for i, layer in enumerate(layers):
        base = (c["resid_pre", layer][0, t] + c["attn_out", layer][0, t]).double()
        coefficients = c["mlp_act", layer][0, t].double()
        w_down = text_model(model).layers[layer].mlp.down_proj.weight.double()  # [d, d_mlp]
        # Gemma-3: through the post-feed-forward norm, its scale frozen at the forward's (else ones)
        factor = post_norm_factor(any_vqa, layer, "mlp", a.down_proj(layer)(c["mlp_act", layer][0, t]))
        w_down = factor.unsqueeze(1) * w_down
        # the neurons' contributions add up to the MLP output
        torch.testing.assert_close((w_down * coefficients).sum(1), c["mlp_out", layer][0, t].double(),
                                   rtol=1e-5, atol=1e-6)
        expected = torch.tensor([lp(base + coefficients[k] * w_down[:, k]) - lp(base) for k in range(a.d_mlp)])
        torch.testing.assert_close(result.scores[i], expected.float(), rtol=1e-4, atol=2e-5)
        torch.testing.assert_close(result.coefficients[i], coefficients.float())
        assert result.top_neurons[i].tolist() == expected.topk(4).indices.tolist()
        for rank, neuron in enumerate(result.top_neurons[i].tolist()):
            promoted = (W_U @ (gamma * coefficients[neuron] * w_down[:, neuron])).topk(3).indices
            assert result.promoted[i][rank] == any_vqa.to_str_tokens(promoted)


def test_neurons_save_load_errors_and_state(tiny_vqa, prepared, tmp_path):
    tiny_vqa.logits(prepared)  # HF adds its own hooks on a model's first forward: snapshot after one
    before, hooks = model_state(tiny_vqa.model), hook_snapshot(tiny_vqa.model)
    result = neuron_increase(tiny_vqa, prepared, k=2, progress=False)
    assert result.scores.shape == (tiny_vqa.adapter.n_layers, tiny_vqa.adapter.d_mlp)
    frame = result.to_dataframe()
    assert len(frame) == 2 * tiny_vqa.adapter.n_layers and set(frame["rank"]) == {1, 2}
    assert result.topk(1)["increase"].item() == pytest.approx(float(result.scores.max()))
    loaded = Result.load(result.save(tmp_path / "neurons"))
    torch.testing.assert_close(loaded.scores, result.scores)
    assert loaded.promoted == result.promoted and loaded.target == result.target
    with pytest.raises(IndexError, match="layer 5 is out of range"):
        neuron_increase(tiny_vqa, prepared, layers=[5])
    with pytest.raises(ValueError, match="no layers"):
        neuron_increase(tiny_vqa, prepared, layers=[])
    assert_same_state(before, model_state(tiny_vqa.model))
    assert hook_snapshot(tiny_vqa.model) == hooks


def test_capture_without_mlp_activations_is_one_clear_error(tiny_vqa, prepared):
    """``explain`` without neurons skips the MLP activations; asking a neuron attribution of such a
    capture names the fix instead of failing inside the scoring."""
    from mech_vqa.methods.mechanistic import capture_target
    from mech_vqa.methods.neurons import neuron_increase_from_capture

    capture = capture_target(tiny_vqa, prepared, kv_layers=None, mlp_act=False)
    assert capture.mlp_act is None
    with pytest.raises(ValueError, match="mlp_act=True"):
        neuron_increase_from_capture(capture, progress=False)
