"""Visually relevant answer tokens (Xing et al. 2025, arXiv 2503.13891, Sec. 3.2).

An open-ended answer ``y_1..y_T`` is mostly text the model could write without looking ("The
color of the ... is"); explaining those tokens explains the language prior, not the image. The
authors keep the tokens whose probability *drops* when the image is replaced by a baseline ``B``
(a heavy blur)::

    gap_t = log p(y_t | I) - log p(y_t | B)                  (teacher-forced, float32)
    S = { t : gap_t > tau  and  y_t is a content token }      (tau = 1.0)

A one-token answer is kept iff ``p(y_1 | B) <= 0.5 p(y_1 | I)``, i.e. ``gap_1 >= log 2`` (the
stop-word filter is not applied to it: a one-word answer such as "no" *is* the content).

Content tokens are decided without any tokenizer-specific ids: each token id is decoded on its
own, stripped of whitespace, and rejected when it is a special token, empty, made only of unicode
punctuation (category ``P*``), or an English stop word (case-insensitive). The authors hard-code
LLaMA ids instead.

An empty ``S`` is a valid outcome (``TokenSelection.empty``), not an exception, so batch runs can
record and skip the sample; ``S`` can also be given by hand. A caller that needs one token anyway
(the method comparison) takes :func:`fallback_token`: the answer's *own* content word with the
largest gap, never a word copied from the question (in "The color of the solid object is yellow"
the blur hurts "solid", a word the model copies from the question, more than "yellow"; explaining
"solid" would explain the copy, not the answer).
"""

from __future__ import annotations

import dataclasses
import math
import re
import unicodedata
from collections.abc import Callable, Sequence

import torch

from ..inputs import PreparedInput

# NLTK's English stop-word list (the usual choice), plus contraction fragments tokenizers emit.
STOP_WORDS = frozenset("""
i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her
hers herself it its itself they them their theirs themselves what which who whom this that these
those am is are was were be been being have has had having do does did doing a an the and but if
or because as until while of at by for with about against between into through during before
after above below to from up down in out on off over under again further then once here there
when where why how all any both each few more most other some such no nor not only own same so
than too very s t can will just don should now d ll m o re ve y ain aren couldn didn doesn hadn
hasn haven isn ma mightn mustn needn shan shouldn wasn weren won wouldn 's 're 've 'd 'll 'm n't
""".split())


def is_punctuation(text: str) -> bool:
    """True when ``text`` is non-empty and every character is unicode punctuation (``P*``)."""
    return bool(text) and all(unicodedata.category(ch).startswith("P") for ch in text)


def is_content_text(text: str, stop_words: frozenset = STOP_WORDS) -> bool:
    """A decoded token that carries meaning: not empty, not punctuation, not a stop word."""
    text = text.strip()
    return bool(text) and not is_punctuation(text) and text.lower() not in stop_words


def decode_tokens(tokenizer, token_ids: Sequence[int]) -> list[str]:
    """Each token id decoded on its own (no tokenizer-specific prefixes such as '▁' or 'Ġ')."""
    return [tokenizer.decode([int(i)]) for i in token_ids]


@dataclasses.dataclass
class TokenSelection:
    """Which answer tokens are visually relevant, and why.

    Attributes:
        tokens: ``[T]`` decoded answer tokens.
        token_ids: ``[T]`` their ids.
        log_p_image: ``[T]`` float32 ``log p(y_t | I)`` (NaN when given by hand).
        log_p_baseline: ``[T]`` float32 ``log p(y_t | B)`` (NaN when given by hand).
        content: ``[T]`` bool, token is not special/punctuation/stop word.
        selected: ``[T]`` bool, token is in ``S``.
        tau: the threshold used.
        rule: ``"gap"``, ``"single-token ratio"`` or ``"manual"``.
    """

    tokens: list
    token_ids: torch.Tensor
    log_p_image: torch.Tensor
    log_p_baseline: torch.Tensor
    content: torch.Tensor
    selected: torch.Tensor
    tau: float
    rule: str

    @property
    def gaps(self) -> torch.Tensor:
        return self.log_p_image - self.log_p_baseline

    @property
    def indices(self) -> list[int]:
        """Answer-token indices of ``S``."""
        return self.selected.nonzero().flatten().tolist()

    @property
    def empty(self) -> bool:
        return not bool(self.selected.any())

    @property
    def message(self) -> str:
        if not self.empty:
            return f"{len(self.indices)} visually relevant token(s): {[self.tokens[i] for i in self.indices]}"
        if self.rule == "single-token ratio":
            return ("no visually relevant token: the one-token answer keeps more than half its probability "
                    "on the baseline image (p_B > 0.5 p_I)")
        return (f"no visually relevant token: no content token loses more than tau={self.tau} nats of "
                "log-probability when the image is replaced by the baseline")

    def records(self) -> list[dict]:
        """One JSON-able dict per answer token (index, token, id, log-probs, gap, content, selected)."""
        return [{"index": i, "token": self.tokens[i], "token_id": int(self.token_ids[i]),
                 "log_p_image": float(self.log_p_image[i]), "log_p_baseline": float(self.log_p_baseline[i]),
                 "gap": float(self.gaps[i]), "content": bool(self.content[i]), "selected": bool(self.selected[i])}
                for i in range(len(self.tokens))]


def check_tau(tau: float) -> float:
    if not isinstance(tau, (int, float)) or not math.isfinite(tau) or tau < 0:
        raise ValueError(f"tau must be a finite number >= 0 (a log-probability gap in nats), got {tau!r}")
    return float(tau)


def select_tokens(log_p_image: torch.Tensor, log_p_baseline: torch.Tensor, tokens: Sequence[str],
                  token_ids: torch.Tensor | None = None, *, tau: float = 1.0, special: Sequence[bool] | None = None,
                  stop_words: frozenset = STOP_WORDS) -> TokenSelection:
    """Apply the selection rule to given log-probabilities ``[T]`` (see the module docstring)."""
    tau = check_tau(tau)
    log_p_image = torch.as_tensor(log_p_image, dtype=torch.float32).flatten()
    log_p_baseline = torch.as_tensor(log_p_baseline, dtype=torch.float32).flatten()
    n = len(tokens)
    if log_p_image.numel() != n or log_p_baseline.numel() != n:
        raise ValueError(f"need one log-probability per token: {n} tokens, {log_p_image.numel()} image and "
                         f"{log_p_baseline.numel()} baseline values")
    special = [False] * n if special is None else list(special)
    content = torch.tensor([not sp and is_content_text(t, stop_words) for t, sp in zip(tokens, special)],
                           dtype=torch.bool)
    gaps = log_p_image - log_p_baseline
    if n == 1:
        printable = not special[0] and bool(tokens[0].strip()) and not is_punctuation(tokens[0].strip())
        # p_B <= 0.5 p_I  <=>  log p_I - log p_B >= log 2
        selected, rule = torch.tensor([printable and bool(gaps[0] >= math.log(2))]), "single-token ratio"
    else:
        selected, rule = (gaps > tau) & content, "gap"
    token_ids = torch.full((n,), -1, dtype=torch.long) if token_ids is None else torch.as_tensor(token_ids).long()
    return TokenSelection(list(tokens), token_ids, log_p_image, log_p_baseline, content, selected, tau, rule)


def resolve_selection(vqa, inp: PreparedInput, tokens, baseline: torch.Tensor, *, tau: float = 1.0,
                      score_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      gaps_for_manual: bool = False) -> TokenSelection:
    """``S`` as the perturbation methods and metrics accept it: None = the visually relevant tokens
    against ``baseline`` (threshold ``tau``), a :class:`TokenSelection` as given, or answer-token
    indices (:func:`manual_selection`; with ``gaps_for_manual`` their gaps against ``baseline`` are
    scored too, at the cost of one more forward)."""
    if tokens is None:
        return visually_relevant_tokens(vqa, inp, baseline, tau=tau, score_fn=score_fn)
    if isinstance(tokens, TokenSelection):
        return tokens
    return manual_selection(vqa, inp, tokens, baseline=baseline if gaps_for_manual else None, score_fn=score_fn)


def manual_selection(vqa, inp: PreparedInput, indices: Sequence[int], baseline: torch.Tensor | None = None,
                     score_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TokenSelection:
    """``S`` given by hand as answer-token indices. With ``baseline`` pixels, the log-probabilities
    on the image and the baseline (and so the gaps) are recorded too; without, they are NaN."""
    n = int(inp.answer_positions.numel())
    checked = set()
    for i in indices:
        if not -n <= int(i) < n:
            raise IndexError(f"answer token {i} is out of range: the answer has {n} tokens")
        checked.add(int(i) % n)
    if baseline is not None:
        scored = visually_relevant_tokens(vqa, inp, baseline, tau=0.0, score_fn=score_fn)
        log_p_image, log_p_baseline, tokens = scored.log_p_image, scored.log_p_baseline, scored.tokens
        token_ids, content = scored.token_ids, scored.content
    else:
        token_ids = inp.input_ids[0, inp.answer_positions].clone()
        tokens = decode_tokens(vqa.tokenizer, token_ids.tolist())
        special = set(vqa.tokenizer.all_special_ids)
        content = torch.tensor([int(i) not in special and is_content_text(t) for i, t in zip(token_ids, tokens)])
        log_p_image = log_p_baseline = torch.full((n,), float("nan"))
    selected = torch.zeros(n, dtype=torch.bool)
    selected[sorted(checked)] = True
    return TokenSelection(tokens, token_ids, log_p_image, log_p_baseline.clone(), content, selected,
                          float("nan"), "manual")


def visually_relevant_tokens(vqa, inp: PreparedInput, baseline: torch.Tensor, *, tau: float = 1.0,
                             score_fn: Callable[[torch.Tensor], torch.Tensor] | None = None) -> TokenSelection:
    """``S`` for a prepared input: score the answer on the image and on ``baseline`` pixels.

    Args:
        vqa: the model.
        inp: prepared input with the answer teacher-forced.
        baseline: baseline pixel values, shaped like ``inp.pixel_values``
            (see :func:`mech_vqa.methods.scoring.input_baseline`).
        tau: gap threshold in nats (>= 0).
        score_fn: ``pixels [N, ...] -> log p [N, T]`` over *all* answer tokens; default an
            :class:`~mech_vqa.methods.scoring.AnswerScorer` on the model.
    """
    from .scoring import AnswerScorer

    tau = check_tau(tau)
    if inp.answer_positions.numel() == 0:
        raise ValueError("this input has no answer tokens; prepare it with an answer or let it generate one")
    score_fn = score_fn or AnswerScorer(vqa, inp)
    pixels = torch.cat([inp.pixel_values.float(), baseline.float().to(inp.pixel_values.device)])
    with torch.no_grad():
        log_p = score_fn(pixels).float().cpu()                                   # [2, T]
    token_ids = inp.input_ids[0, inp.answer_positions]
    tokens = decode_tokens(vqa.tokenizer, token_ids.tolist())
    special = set(vqa.tokenizer.all_special_ids)
    return select_tokens(log_p[0], log_p[1], tokens, token_ids, tau=tau,
                         special=[int(i) in special for i in token_ids])


def _words(text: str) -> list[tuple[int, int, str]]:
    return [(m.start(), m.end(), m.group().lower()) for m in re.finditer(r"\w+", text)]


def copied_from_question(tokenizer, answer_ids: Sequence[int], question: str) -> torch.Tensor:
    """``[T]`` bool: every word the answer token is part of also occurs in the question.

    Tokenizer-agnostic: each token's character span in the decoded answer comes from decoding the
    growing prefix, and a word split over several tokens counts for each of them. Tokens touching
    no word (punctuation, spaces) are not copied.
    """
    answer_ids = [int(i) for i in answer_ids]
    question_words = {word for _, _, word in _words(question)}
    ends = [len(tokenizer.decode(answer_ids[:i + 1], skip_special_tokens=True)) for i in range(len(answer_ids))]
    text = tokenizer.decode(answer_ids, skip_special_tokens=True)
    words = _words(text)
    copied = []
    for i, end in enumerate(ends):
        start = ends[i - 1] if i else 0
        touched = [word for w_start, w_end, word in words if w_start < end and w_end > start]
        copied.append(bool(touched) and all(word in question_words for word in touched))
    return torch.tensor(copied, dtype=torch.bool)


def fallback_token(selection: TokenSelection, copied: torch.Tensor) -> tuple[int, str]:
    """``(answer-token index, rule)`` to explain when ``S`` is empty; never a token copied from the question.

    In order: the answer's own content token (not copied, not a stop word / punctuation / special)
    with the largest gap; else its own printable token with the largest gap. An answer made only of
    question words (or punctuation) has nothing of its own: a clear error asks for the tokens by hand.
    """
    copied = torch.as_tensor(copied, dtype=torch.bool)
    if copied.numel() != len(selection.tokens):
        raise ValueError(f"need one copied flag per answer token: {len(selection.tokens)} tokens, "
                         f"{copied.numel()} flags")
    gaps = selection.gaps.nan_to_num(nan=float("-inf"))
    printable = torch.tensor([bool(t.strip()) and not is_punctuation(t.strip()) for t in selection.tokens],
                             dtype=torch.bool)
    for allowed, rule in ((selection.content.bool() & ~copied, "fallback: the answer's own content word, largest gap"),
                          (printable & ~copied, "fallback: the answer's own token (no own content word), largest gap")):
        if allowed.any():
            candidates = allowed.nonzero().flatten()
            return int(candidates[gaps[candidates].argmax()]), rule
    raise ValueError(f"no visually relevant answer token, and every printable token of the answer {selection.tokens} "
                     "is copied from the question, so there is no answer word of its own to explain; pass the "
                     "answer-token indices to explain by hand (tokens=[...])")
