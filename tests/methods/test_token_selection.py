"""Visually relevant token selection: the rule on constructed log-probabilities, the stop-word and
punctuation filter, and the real selection code on a planted image dependency."""

import math

import pytest
import torch

from mech_vqa.methods.scoring import AnswerScorer, input_baseline
from mech_vqa.methods.token_selection import (
    copied_from_question,
    fallback_token,
    is_content_text,
    manual_selection,
    select_tokens,
    visually_relevant_tokens,
)


def test_content_filter_is_tokenizer_agnostic():
    for text in ["the", " The", "IS", "of", ".", " ,", "?!", "。", "—", "«", "", "  ", "'s"]:
        assert not is_content_text(text), text
    for text in ["red", " Dog", "striped", "circle", "42", "+", "été"]:
        assert is_content_text(text), text


def test_gap_rule_selects_content_tokens_above_tau():
    tokens = ["The", "dog", "is", "red", "."]
    image = torch.tensor([-0.1, -0.5, -0.2, -0.3, -0.1])
    base = torch.tensor([-3.0, -0.9, -4.0, -2.0, -5.0])   # gaps 2.9, 0.4, 3.8, 1.7, 4.9
    sel = select_tokens(image, base, tokens, tau=1.0)
    assert sel.indices == [3]                            # 'The', 'is', '.' are filtered despite big gaps
    torch.testing.assert_close(sel.gaps, image - base)
    assert sel.rule == "gap" and not sel.empty
    assert select_tokens(image, base, tokens, tau=0.3).indices == [1, 3]
    assert select_tokens(image, base, tokens, tau=2.0).empty


def test_single_token_answer_ratio_rule():
    p_image = math.log(0.8)
    keep = select_tokens([p_image], [math.log(0.39)], ["yes"])     # 0.39 <= 0.5 * 0.8
    drop = select_tokens([p_image], [math.log(0.41)], ["yes"])     # 0.41 >  0.5 * 0.8
    assert keep.indices == [0] and keep.rule == "single-token ratio"
    assert drop.empty and "p_B > 0.5 p_I" in drop.message
    # a one-word answer that happens to be a stop word ("no") is still the content
    assert select_tokens([p_image], [math.log(0.1)], ["no"]).indices == [0]
    assert select_tokens([p_image], [math.log(0.1)], ["."]).empty


def test_bad_tau_and_mismatched_lengths():
    for tau in (-0.1, float("nan"), float("inf"), "1"):
        with pytest.raises(ValueError, match="tau"):
            select_tokens([0.0, 0.0], [0.0, 0.0], ["a", "b"], tau=tau)
    with pytest.raises(ValueError, match="one log-probability per token"):
        select_tokens([0.0], [0.0, 0.0], ["a", "b"])


def _planted_score_fn(inp, depends_on: int, rows: slice, cols: slice):
    """log p [N, T]: answer token ``depends_on`` needs the image's pixels in (rows, cols); others are constant."""
    reference = inp.pixel_values[0].float()
    n_tokens = inp.answer_positions.numel()

    def score(pixels):
        distance = ((pixels.float() - reference)[:, :, rows, cols] ** 2).mean(dim=(1, 2, 3))
        out = torch.full((pixels.shape[0], n_tokens), -0.5)
        out[:, depends_on] = torch.nn.functional.logsigmoid(3.0 - 10.0 * distance)
        return out

    return score


def test_real_selection_picks_the_image_dependent_token(tiny_vqa, prepared):
    """'red' (index 3) depends on the top-left pixels, 'dog' (1) does not: only 'red' is selected."""
    assert prepared.str_tokens[prepared.prompt_length:] == ["the", "dog", "is", "red", "."]
    base = input_baseline(tiny_vqa, prepared, "black")
    score = _planted_score_fn(prepared, 3, slice(0, 16), slice(0, 16))
    sel = visually_relevant_tokens(tiny_vqa, prepared, base, score_fn=score)
    assert sel.indices == [3] and sel.tokens[3] == "red"
    assert sel.gaps[3] > 1.0 and abs(float(sel.gaps[1])) < 1e-6
    # the same rule with the dependency planted on 'the' selects nothing: a stop word is never S
    planted_on_the = _planted_score_fn(prepared, 0, slice(0, 16), slice(0, 16))
    empty = visually_relevant_tokens(tiny_vqa, prepared, base, score_fn=planted_on_the)
    assert empty.empty and "no visually relevant token" in empty.message and empty.gaps[0] > 1.0


def test_selection_with_the_model_scorer_matches_its_log_probs(tiny_vqa, prepared):
    base = input_baseline(tiny_vqa, prepared, "blur")
    sel = visually_relevant_tokens(tiny_vqa, prepared, base, tau=0.0)
    with torch.no_grad():
        logits_image = tiny_vqa.forward(prepared).logits[0].float()
        batch = dict(prepared.model_inputs(), pixel_values=base)
        logits_base = tiny_vqa.model(**batch, use_cache=False).logits[0].float()
    pos, ids = prepared.answer_positions - 1, prepared.input_ids[0, prepared.answer_positions]
    for logits, got in ((logits_image, sel.log_p_image), (logits_base, sel.log_p_baseline)):
        torch.testing.assert_close(got, logits.log_softmax(-1)[pos, ids], rtol=0, atol=1e-5)
    assert set(sel.indices) <= {1, 3}       # only 'dog' and 'red' are content tokens


def test_manual_selection_and_errors(tiny_vqa, prepared):
    sel = manual_selection(tiny_vqa, prepared, [3, -4])
    assert sel.indices == [1, 3] and sel.rule == "manual" and sel.gaps.isnan().all()
    base = input_baseline(tiny_vqa, prepared, "blur")
    scored = manual_selection(tiny_vqa, prepared, [3], baseline=base)
    torch.testing.assert_close(scored.gaps, visually_relevant_tokens(tiny_vqa, prepared, base).gaps)
    assert scored.indices == [3]
    with pytest.raises(IndexError, match="out of range"):
        manual_selection(tiny_vqa, prepared, [5])
    with pytest.raises(ValueError, match="no answer tokens"):
        AnswerScorer(tiny_vqa, tiny_vqa.prepare(prepared.image, "What is the color of the dog?", generate=False))


def test_fallback_prefers_the_answers_own_content_word():
    tokens = ["The", "color", "of", "the", "solid", "object", "is", "yellow"]
    image = torch.zeros(8)
    base = -torch.tensor([0.1, 0.2, 0.0, 0.1, 0.9, 0.3, 0.1, 0.6])        # no gap > tau; "solid" largest
    selection = select_tokens(image, base, tokens, tau=1.0)
    copied = torch.tensor([True, True, True, True, True, True, True, False])
    assert selection.empty and fallback_token(selection, copied) == (
        7, "fallback: the answer's own content word, largest gap")
    # no own content word: its own printable token; nothing of its own: a clear error
    own_stop = select_tokens(image, base, tokens[:7] + ["it"], tau=1.0)
    assert fallback_token(own_stop, copied)[0] == 7 and "no own content word" in fallback_token(own_stop, copied)[1]
    with pytest.raises(ValueError, match="copied from the question"):
        fallback_token(selection, torch.ones(8, dtype=torch.bool))


def test_copied_tokens_are_found_by_word(tiny_vqa):
    tokenizer = tiny_vqa.tokenizer
    ids = tokenizer("The dog is yellowish red.", add_special_tokens=False)["input_ids"]
    copied = copied_from_question(tokenizer, ids, "What colour is the Dog?")
    words = {tokenizer.decode(ids[: i + 1]).split()[-1].strip(".").lower() for i in range(len(ids)) if copied[i]}
    assert words <= {"the", "dog", "is"} and copied.any()
    assert not copied[-1]                                            # the final "." touches no word
