"""Attention knockout: block attention edges between token groups over a window of layers.

Zhang et al., "Cross-modal Information Flow in Multimodal Large Language Models" (CVPR 2025,
arXiv 2411.18620), after Geva et al. (2023): to ask whether information flows from a *source*
group of positions (the image) to a *target* group (the question, or the last position), remove
every attention edge target -> source in a window of consecutive layers and measure how much the
answer's probability changes::

    relative_change = (p_knocked - p_clean) / p_clean        (p of the answer target(s), fp32)

for every window as it slides over the layers, one curve per (source, target) pair. A large drop
in a window says the information crosses from source to target there.

Blocking, exactly. In each layer of the window and for each query position ``i`` of the target
group, the pre-softmax score of every key ``j`` of the source group is set to ``-inf``; the softmax
then gives those edges exactly zero weight and renormalises the row over its remaining (causal)
edges. This is what the authors' code does through the attention mask (the blocked entries of the
additive mask get the dtype's minimum instead of 0, i.e. ``-inf`` up to underflow; their
``set_block_attn_hooks``): the row is renormalised, not left with the blocked weight missing.
Per head (``heads=True``) the same edges are blocked in one head at a time. A query row left with
no edge at all (a group blocked from everything it could read) is an error, since its softmax is
undefined.

Windows. By default, as in the paper, one window per layer ``l``: the ``window`` layers centred on
``l`` (``l - window // 2 .. l + ceil(window / 2) - 1``), clipped at the first and last layer; the
paper uses 9 of LLaVA's 32 layers, and the default here scales that to the model's depth
(``round(9 * n_layers / 32)``, at least 1). ``windows=[(start, stop), ...]`` gives explicit
half-open layer ranges instead.

Groups (:data:`GROUPS`): ``image`` (every image token), ``question`` (the question's tokens),
``last`` (the rows that predict the answer targets: the last prompt position for the first answer
token, as in the paper), ``all`` (every position up to the last target row), or an explicit list of
sequence positions. The targets default to the first answer token (the paper's measure); pass
``targets`` to measure another, e.g. the answer word of a teacher-forced sentence.

Cost. Layers before a window are unchanged, and so is every row before the first query row of the
target group (causal attention): each run recomputes only rows ``first..last`` from the window's
first layer on, with the clean run's keys and values of earlier rows
(:class:`~mech_vqa.runner.AnswerRowRunner`); runs that share a first layer and first row are
batched. A knockout into ``last`` is a one-row decoding step per layer. On other backends (nnsight,
locally or remotely) each batch is one whole forward whose layers' attention masks carry the blocked
edges (:class:`~mech_vqa.runner.FullForwardAnswerRows`): the same numbers, at a forward's cost.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from ..results.knockout import KnockoutResult
from ..runner import answer_rows_for

GROUPS = ("image", "question", "last", "all")
DEFAULT_PAIRS = (("image", "question"), ("image", "last"), ("question", "last"))
PAPER_WINDOW, PAPER_LAYERS = 9, 32


def default_window(n_layers: int) -> int:
    """The paper's 9-of-32-layer window scaled to ``n_layers`` (at least 1)."""
    return max(1, round(PAPER_WINDOW * n_layers / PAPER_LAYERS))


def centred_windows(n_layers: int, size: int) -> list[tuple[int, int, int]]:
    """``(start, stop, centre)`` for every layer: ``size`` layers centred on it, clipped (the paper's)."""
    return [(max(0, layer - size // 2), min(n_layers, layer + (size + 1) // 2), layer) for layer in range(n_layers)]


def group_positions(inp, group, targets) -> list[int]:
    """Sequence positions of a named group (:data:`GROUPS`) or of an explicit position list."""
    rows = sorted({t.position for t in targets})
    if isinstance(group, str):
        name = group.lower()
        if name == "image":
            return inp.image_positions.tolist()
        if name == "question":
            return inp.question_positions.tolist()
        if name in ("last", "answer"):
            return rows
        if name in ("all", "everything"):
            return list(range(max(rows) + 1))
        raise ValueError(f"unknown token group {group!r}; choose one of {GROUPS} or give a list of sequence positions")
    try:
        positions = [int(p) for p in torch.as_tensor(group).flatten().tolist()]
    except (TypeError, ValueError) as err:
        raise ValueError(f"token group {group!r} is neither a name in {GROUPS} nor a list of positions") from err
    bad = [p for p in positions if not 0 <= p < inp.seq_len]
    if bad:
        raise ValueError(f"token group positions {bad} fall outside the sequence 0..{inp.seq_len - 1}")
    return sorted(set(positions))


def _label(group) -> str:
    return group.lower() if isinstance(group, str) else "positions[" + ",".join(
        str(int(p)) for p in torch.as_tensor(group).flatten().tolist()) + "]"


def _check_windows(windows, n_layers: int) -> list[tuple[int, int, int]]:
    out = []
    for window in windows:
        try:
            start, stop = (int(v) for v in window)
        except (TypeError, ValueError) as err:
            raise ValueError(f"window {window!r} is not a (start, stop) pair of layers") from err
        if stop <= start:
            raise ValueError(f"window ({start}, {stop}) is empty; windows are half-open layer ranges (start, stop) "
                             "with start < stop")
        if start < 0 or stop > n_layers:
            raise ValueError(f"window ({start}, {stop}) reaches past the model's layers 0..{n_layers - 1}; "
                             f"stop may be at most {n_layers}")
        out.append((start, stop, start))
    if not out:
        raise ValueError("no windows given; pass windows=[(start, stop), ...] or leave it None for every layer")
    return out


def knockout(vqa, inp, pairs: Sequence = DEFAULT_PAIRS, *, window: int | None = None,
             windows: Sequence[tuple[int, int]] | None = None, heads: bool = False, targets=None,
             batch_size: int = 32, progress: bool = True) -> KnockoutResult:
    """Attention knockout of every ``(source, target)`` pair in every window; see the module docstring.

    Args:
        pairs: ``(source, target)`` token groups; edges target -> source are blocked ("source ↛ target").
        window: window size for the paper's centred windows (default :func:`default_window`).
        windows: explicit half-open ``(start, stop)`` layer ranges instead.
        heads: block the edges in one head at a time (a result per head) instead of all heads.
        targets: answer targets to measure (default: the first answer token).
        batch_size: knockouts per batched run.
    """
    adapter = vqa.adapter
    n_layers = adapter.n_layers
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    targets = list(targets) if targets is not None else ([inp.target(0)] if inp.answer_positions.numel() else [])
    if not targets:
        raise ValueError("no targets: prepare the input with an answer")
    pairs = [tuple(pair) for pair in pairs]
    if not pairs or any(len(pair) != 2 for pair in pairs):
        raise ValueError(f"pairs must be (source, target) token groups, got {pairs!r}")
    if windows is None:
        size = default_window(n_layers) if window is None else int(window)
        if not 1 <= size <= n_layers:
            raise ValueError(f"window size {size} must lie in 1..{n_layers} (the model's layers)")
        spans = centred_windows(n_layers, size)
    else:
        size = None
        spans = _check_windows(windows, n_layers)
    start_time = time.perf_counter()
    rows = torch.tensor([t.position for t in targets])
    token_ids = torch.tensor([t.token_id for t in targets])
    last = int(rows.max())
    groups = {}
    for pair in pairs:
        for group in pair:
            positions = group_positions(inp, group, targets)
            if isinstance(group, str) and not positions:
                raise ValueError(f"token group {group!r} is empty for this input")
            groups[_label(group)] = positions
    labels = [(_label(s), _label(t)) for s, t in pairs]

    runner = answer_rows_for(vqa, inp, rows)
    device = runner.device
    clean = runner.clean_logits_at(rows).log_softmax(-1)
    clean_logprob = clean.gather(-1, token_ids[:, None].to(clean.device))[:, 0].sum().cpu()

    # edges[pair]: [last + 1, last + 1] bool, query row (target) x key (source) to remove
    edges, firsts = [], []
    for source, target in labels:
        edge = torch.zeros(last + 1, last + 1, dtype=torch.bool, device=device)
        queries = torch.tensor([p for p in groups[target] if p <= last], dtype=torch.long, device=device)
        keys = torch.tensor([p for p in groups[source] if p <= last], dtype=torch.long, device=device)
        if queries.numel() and keys.numel():
            edge[queries[:, None], keys[None, :]] = True
        edges.append(edge)
        firsts.append(min(int(queries.min()) if queries.numel() else last, int(rows.min())))

    n_heads = adapter.n_heads
    head_list = list(range(n_heads)) if heads else [None]
    items = [(p, w, h) for p in range(len(labels)) for w in range(len(spans)) for h in head_list]
    # a pair with no edge between its groups blocks nothing: its runs are the clean run, exactly
    knocked = torch.full((len(items),), float(clean_logprob))
    runs: dict[tuple[int, int], list[int]] = defaultdict(list)
    for index, (p, w, _) in enumerate(items):
        if edges[p].any():
            runs[(spans[w][0], firsts[p])].append(index)
    chunks = [(key, members[i:i + batch_size]) for key, members in sorted(runs.items())
              for i in range(0, len(members), batch_size)]
    for (start, first), members in tqdm(chunks, desc="knockout", disable=not progress):
        chunk = [items[i] for i in members]

        def blocked(layer, first_row, last_row, chunk=chunk):
            active = [(b, p, h) for b, (p, w, h) in enumerate(chunk) if spans[w][0] <= layer < spans[w][1]]
            if not active:
                return None
            mask = torch.zeros(len(chunk), n_heads if heads else 1, last_row - first_row + 1, last_row + 1,
                               dtype=torch.bool, device=device)
            for b, p, h in active:
                mask[b, slice(None) if h is None else h] = edges[p][first_row:last_row + 1, :last_row + 1]
            return mask

        logprobs = runner.run_rows(start, len(chunk), rows, first=first, blocked=blocked).cpu()
        chosen = logprobs.gather(-1, token_ids.view(1, -1, 1).expand(len(chunk), -1, 1))[..., 0]
        knocked[members] = chosen.sum(-1)
    shape = (len(labels), len(spans), n_heads) if heads else (len(labels), len(spans))
    knocked = knocked.view(shape)
    return KnockoutResult(
        relative_change=torch.expm1(knocked - clean_logprob), knocked_logprob=knocked, clean_logprob=clean_logprob,
        pairs=[list(label) for label in labels], windows=[[s, e] for s, e, _ in spans],
        anchors=[a for _, _, a in spans], per_head=heads, groups=groups, targets=[t.to_dict() for t in targets],
        info={"model": vqa.name, "prompt": inp.prompt, "answer": inp.answer, "n_layers": n_layers,
              "n_heads": n_heads, "window": size, "windows": "centred" if size is not None else "explicit",
              "batch_size": batch_size, "runs": len(chunks), "runtime_s": time.perf_counter() - start_time},
    )
