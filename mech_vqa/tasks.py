"""Per-item tasks for dataset runs (``mech-vqa run TASK``): each returns one JSON-able dict.

Every task answers the question greedily first and reports ``prediction`` and ``correct`` (the
expected answer word — ``answer_word`` of the row, else the given answer — appears in the
prediction), then teacher-forces the given answer (or the prediction when none is given).

:data:`TASK_HELP` says what each task computes and which columns its rows hold (shown by
``mech-vqa run --help``); this module imports no torch at import time, so the help stays fast.
"""

from __future__ import annotations

import re

COMMON_COLUMNS = ("every row: id, index, image, question, status (ok / error), error (when status is error), "
                  "runtime_s, non_finite (fields written as null because they were NaN / infinite)")

TASK_HELP = {
    "answer": ("the greedy answer and whether it is right. Columns: prediction, correct (the expected "
               "answer word appears in the prediction; null without one), answer (the teacher-forced answer)."),
    "explain": ("the mechanistic explanation of the answer-word token: what each layer's attention and MLP "
                "add to its log-probability, the top heads, and where the top head reads in the image. "
                "Columns: prediction, correct, answer, target {token_id, position, token}, top_heads "
                "(5 x {layer, head, increase}), layer_attn_increase, layer_mlp_increase (per layer, nats); "
                "with a box: pointing_game, in_box_share of the top head's map."),
    "compare": ("every patch-importance method on the same visually relevant answer tokens, scored. Columns: "
                "prediction, correct, answer, targets, selection_rule, methods {name: {insertion_auc, "
                "deletion_auc, pointing_game, in_box_share, runtime_s, ...}}, correlations {a|b: Spearman}."),
    "ablate": ("zero each head, each attention / MLP block, and the object's patches against the others, on "
               "the answer-word token. Columns: prediction, correct, answer, target, clean_logprob, top_heads "
               "(5 most harmful heads: ablation, delta_logprob, flipped), head_delta (layers x heads), "
               "heads_flipping, blocks, image_ablations (object / other patches, with a box)."),
    "knockout": ("attention knockout (Zhang et al. 2025) on the answer-word token: the relative change of its "
                 "probability when the edges image -> question, image -> last and question -> last are blocked in "
                 "a window of layers centred on each layer. Columns: prediction, correct, answer, target, "
                 "clean_prob, knockout {pairs, windows, layers, window, relative_change (pairs x windows)}, "
                 "strongest {pair: {window, relative_change}}."),
    "patch": ("activation patching: a corrupted image (organism rows: the asked object's colour / pattern changed; "
              "others: the image blurred), then each clean activation restored into the corrupted run. Columns: "
              "prediction, correct, answer, pair {kind, change...}, metric (logit_diff / logprob), targets, "
              "clean_score, corrupt_score, flag, group_fraction {image, object, question, answer: per layer}, "
              "head_fraction (layers x heads), mlp_fraction (per layer), top_heads (5), patch_layer and, with a "
              "box, pointing_game and in_box_share of the image-patch restoration map at that layer."),
}


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def answer_item(vqa, image, question, answer, row):
    """Greedy prediction, correctness, and the prepared input with the answer forced."""
    prediction = vqa.generate(image, question)
    expected = row.get("answer_word") or answer
    correct = None
    if expected:
        want = _words(expected)
        got = _words(prediction)
        correct = any(got[i:i + len(want)] == want for i in range(len(got) - len(want) + 1)) if want else None
    inp = vqa.prepare(image, question, answer or prediction or None, generate=False)
    return inp, {"prediction": prediction, "correct": correct, "answer": inp.answer}


def answer_target(inp, row) -> int:
    """Index of the answer token that carries the answer word (else the first answer token).

    The last occurrence counts: the answer word ends the answer, while an earlier one may echo the
    question ("the color of the red object is red").
    """
    word = (row.get("answer_word") or "").lower()
    tokens = [inp.str_tokens[p].lower().lstrip("▁Ġ") for p in inp.answer_positions.tolist()]
    return len(tokens) - 1 - tokens[::-1].index(word) if word and word in tokens else 0


def task_answer(vqa, *, image, question, answer, box, row):
    _, out = answer_item(vqa, image, question, answer, row)
    return out


def task_ablate(vqa, *, image, question, answer, box, row, batch_size: int = 16):
    """Head and block sweeps on the answer token, and the object's patches ablated against the rest."""
    import torch

    from .methods.ablation import ablate, block_ablations, head_ablations, image_token_ablation

    inp, out = answer_item(vqa, image, question, answer, row)
    target = inp.target(answer_target(inp, row))
    ablations = head_ablations(vqa) + block_ablations(vqa)
    if box is not None:
        inside = inp.positions_in_box(inp.box_to_model(box))
        outside = [p for p in inp.image_positions.tolist() if p not in set(inside)]
        if inside:
            ablations.append(image_token_ablation(vqa, inp, inside, name="object patches"))
        if outside:
            ablations.append(image_token_ablation(vqa, inp, outside, name="other patches"))
    result = ablate(vqa, inp, ablations, targets=[target], batch_size=batch_size, progress=False)
    frame = result.to_dataframe()
    heads = frame[frame.kind == "head"].sort_values("delta_logprob")
    out.update({
        "target": target.to_dict(),
        "clean_logprob": float(result.clean_logprob[0]),
        "top_heads": heads.head(5)[["ablation", "delta_logprob", "flipped"]].to_dict("records"),
        "head_delta": result.head_grid().tolist(),
        "heads_flipping": int(result.flipped[torch.tensor([k == "head" for k in result.kinds])].sum()),
        "blocks": frame[frame.kind.isin(["attn", "mlp"])][["ablation", "delta_logprob", "flipped"]].to_dict("records"),
        "image_ablations": frame[frame.kind == "image"][["ablation", "delta_logprob", "flipped"]].to_dict("records"),
    })
    return out


def task_explain(vqa, *, image, question, answer, box, row, view: int = 0):
    """Mechanistic explanation of the answer-word token: layers, top heads, the top head's image map
    (``view`` 1: a tiled model's high-resolution tokens)."""
    from .methods.mechanistic import explain

    inp, out = answer_item(vqa, image, question, answer, row)
    target = inp.target(answer_target(inp, row))
    model_box = inp.box_to_model(box) if box is not None else None
    explanation = explain(vqa, inp, target, heads="top", box=model_box, view=view, progress=False)
    heads = explanation.heads.topk(5)
    out.update({"target": target.to_dict(), "top_heads": heads.to_dict("records"),
                "layer_attn_increase": explanation.layers.attention.tolist(),
                "layer_mlp_increase": explanation.layers.mlp.tolist()})
    if model_box is not None:
        patch_map = explanation.patch_map
        out.update({"pointing_game": patch_map.pointing_game(), "in_box_share": patch_map.in_box_share()})
    return out


def task_compare(vqa, *, image, question, answer, box, row, methods=None, options=None, view: int = 0):
    """Every patch-importance method on the same visually relevant answer tokens, scored
    (``view`` 1: a tiled model's high-resolution tokens)."""
    from .compare import compare

    inp, out = answer_item(vqa, image, question, answer, row)
    model_box = inp.box_to_model(box) if box is not None else None
    comparison = compare(vqa, inp, methods=methods, box=model_box, progress=False, options=options, view=view)
    out.update({"targets": comparison.info["targets"], "selection_rule": comparison.info["selection_rule"],
                "methods": {r["method"]: {k: v for k, v in r.items() if k != "method"} for r in comparison.table},
                "correlations": comparison.correlations,
                "faithfulness": comparison.info.get("faithfulness"), "head_claims": comparison.info.get("head_claims")})
    return out


def task_knockout(vqa, *, image, question, answer, box, row, window: int | None = None):
    """Attention knockout of the default group pairs in the paper's centred windows, on the answer word."""
    from .methods.knockout import knockout

    inp, out = answer_item(vqa, image, question, answer, row)
    target = inp.target(answer_target(inp, row))
    result = knockout(vqa, inp, window=window, targets=[target], progress=False)
    names = result.pair_names()
    out.update({
        "target": target.to_dict(), "clean_prob": float(result.clean_logprob.exp()),
        "knockout": {"pairs": names, "windows": result.windows, "layers": result.anchors,
                     "window": result.info["window"], "relative_change": result.relative_change.tolist()},
        "strongest": {name: {"window": list(result.strongest_window(p)),
                             "relative_change": float(result.relative_change[p].min())}
                      for p, name in enumerate(names)},
    })
    return out


def task_patch(vqa, *, image, question, answer, box, row, batch_size: int = 16, seed: int = 0):
    """Restore clean activations into a corrupted run: per-layer groups of positions, heads, MLPs, and
    each image position at the middle layer (a map scored against the box)."""
    from .methods.patching import (baseline_pair, counterfactual_pair, group_restorations, head_restorations,
                                   image_restorations, mlp_restorations, pair_groups, restore)

    inp, out = answer_item(vqa, image, question, answer, row)
    model_box = inp.box_to_model(box) if box is not None else None
    if row.get("objects") and row.get("family") in ("color", "pattern") and answer:
        from .organism.synthetic import SceneObject, VQAItem

        objects = [SceneObject(o["shape"], o["color"], o["pattern"], tuple(o["box"])) for o in row["objects"]]
        item = VQAItem(image, question, answer, row.get("answer_word") or answer.split()[-1],
                       tuple(row.get("box") or objects[row["target"]].box), None, len(objects), row["family"],
                       objects, int(row["target"]))
        pair = counterfactual_pair(vqa, item, seed=seed)
    else:
        pair = baseline_pair(vqa, inp, "blur", box=model_box)
    layer = vqa.adapter.n_layers // 2
    restorations = (group_restorations(vqa, pair_groups(pair)) + head_restorations(vqa) + mlp_restorations(vqa)
                    + image_restorations(vqa, pair, layer))
    result = restore(vqa, pair, restorations, batch_size=batch_size)
    frame = result.to_dataframe()
    heads = frame[frame.site == "z"].sort_values("patched", ascending=False)
    out.update({
        "pair": {"kind": pair.kind, **{k: v for k, v in pair.info.items() if k != "corrupt_image"}},
        "metric": result.info["metric"], "targets": result.targets, "clean_score": result.clean_score,
        "corrupt_score": result.corrupt_score, "flag": result.info["flag"],
        "group_fraction": {label: line.tolist() for label, line in result.group_lines().items()},
        "head_fraction": result.head_grid().tolist(), "mlp_fraction": result.layer_line("mlp_out").tolist(),
        "top_heads": heads.head(5)[["restoration", "fraction"]].to_dict("records"), "patch_layer": layer,
    })
    if result.box is not None:
        patch_map = result.patch_map(layer)
        out.update({"pointing_game": patch_map.pointing_game(), "in_box_share": patch_map.in_box_share()})
    return out


TASKS = {"answer": task_answer, "explain": task_explain, "compare": task_compare, "ablate": task_ablate,
         "knockout": task_knockout, "patch": task_patch}
