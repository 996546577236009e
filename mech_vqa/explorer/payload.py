"""Results -> the JSON payload the explorer's page draws (one answer: its tokens, maps, heads, lens...).

The page (``static/view.js``) reads one dict::

    {"kind", "title", "question", "answer", "model",
     "image": {"src": data URI, "height", "width"} | None, "box": [x0, y0, x1, y1] | None,
     "tokens": [{"text", "position", "computed"}], "selected": index of the token shown first,
     "per_token": {"<index>": {"maps": [...], "heads": {...}, "head_maps": {"l,h": grid}, "head_text": {...},
                               "layers": {...}, "curves": [...]}},
     "lens": {...} | None, "ablation": {...} | None, "table": [...] | None, "notes": [...]}

Grids are nested lists ``[rows][cols]`` rounded to 4 significant digits of the grid's largest
magnitude (enough for a colour scale and a hover read-out; NaN becomes null). Nothing here imports
a model: the app and the static views share it.
"""

from __future__ import annotations

import base64
import io
import math

import numpy as np
import torch

SIGNIFICANT = 4
# images larger than this (pixels) are written as JPEG: a 336 x 336 PNG alone is ~200 kB
PNG_MAX_PIXELS = 256 * 256


def rounded(values, significant: int = SIGNIFICANT):
    """``values`` as nested lists, rounded to ``significant`` digits of their largest magnitude; NaN -> None."""
    # float64 before rounding: a float32 0.1235 prints as 0.12349999696016312 in JSON
    array = values.detach().double().cpu().numpy() if torch.is_tensor(values) else np.asarray(values, dtype=float)
    finite = np.isfinite(array)
    peak = float(np.abs(array[finite]).max()) if finite.any() else 0.0
    decimals = significant - 1 - int(math.floor(math.log10(peak))) if peak > 0 else 0
    out = np.round(array, max(decimals, 0))
    if out.ndim == 0:
        return float(out) if finite else None
    out = out.astype(object)
    out[~finite] = None
    return out.tolist()


def image_uri(image) -> dict | None:
    """``{"src": data URI, "height", "width"}`` of an ``[H, W, 3]`` float image in [0, 1] (or uint8)."""
    if image is None:
        return None
    from PIL import Image

    array = image.detach().cpu().numpy() if torch.is_tensor(image) else np.asarray(image)
    if array.dtype != np.uint8:
        array = (np.clip(array.astype(float), 0, 1) * 255 + 0.5).astype(np.uint8)
    height, width = array.shape[:2]
    buffer = io.BytesIO()
    if height * width <= PNG_MAX_PIXELS:
        Image.fromarray(array).save(buffer, format="PNG", optimize=True)
        mime = "image/png"
    else:
        Image.fromarray(array).convert("RGB").save(buffer, format="JPEG", quality=88)
        mime = "image/jpeg"
    return {"src": f"data:{mime};base64,{base64.b64encode(buffer.getvalue()).decode()}",
            "height": int(height), "width": int(width)}


def clean_token(text: str) -> str:
    """A token as a reader sees it: SentencePiece / GPT-2 space markers as spaces, newlines visible."""
    return str(text).replace("▁", " ").replace("Ġ", " ").replace("\n", "\\n")


def map_entry(patch_map, name: str | None = None, scores: dict | None = None) -> dict:
    """One method's map for the page: its grid, label, unit, the heads / layers it came from."""
    from ..plotting import components_label, method_label, unit_of

    values = patch_map.scores
    finite = values[torch.isfinite(values)]
    signed = bool(finite.numel() and float(finite.min()) < 0 < float(finite.max())
                  and float(-finite.min()) > 0.05 * float(finite.max()))
    return {"name": name or patch_map.method, "label": name or method_label(patch_map.method),
            "unit": unit_of(patch_map.info), "grid": rounded(values), "signed": signed,
            "components": components_label(patch_map.method, patch_map.info),
            "empty_reason": patch_map.info.get("empty_reason") or patch_map.uninformative,
            "scores": scores or {}}


def curve_entry(name: str, fractions, deletion, insertion, deletion_auc=None, insertion_auc=None,
                flag=None, raw=None) -> dict:
    """One map's curves; ``raw``: the :class:`InsertionDeletion` whose raw curves the page shows when the
    normalised ones are undefined (a flagged item)."""
    def number(value):
        return None if value is None or not math.isfinite(float(value)) else round(float(value), 4)

    return {"name": name, "fractions": rounded(fractions, 3), "deletion": rounded(deletion),
            "insertion": rounded(insertion), "deletion_auc": number(deletion_auc),
            "insertion_auc": number(insertion_auc), "flag": flag,
            **({"deletion_raw": rounded(raw.deletion_raw), "insertion_raw": rounded(raw.insertion_raw),
                "deletion_auc_raw": number(raw.deletion_auc_raw), "insertion_auc_raw": number(raw.insertion_auc_raw)}
               if raw is not None else {})}


def head_text(positions, index: int, image_positions, k: int = 8) -> list:
    """The ``k`` text positions with the largest |increase| for chosen head ``index``: [[pos, token, score]].

    Only positions the head can read (up to the predicting position, causal attention) with a non-zero score."""
    scores = positions.scores[index].float()
    text = scores != 0
    text[int(positions.target.get("position", len(scores) - 1)) + 1:] = False
    if len(image_positions):
        text[torch.as_tensor(list(image_positions), dtype=torch.long)] = False
    candidates = text.nonzero().flatten()
    if not candidates.numel():
        return []
    order = scores[candidates].abs().argsort(descending=True)[:k]
    tokens = positions.str_tokens or [""] * scores.numel()
    return [[int(p), clean_token(tokens[int(p)]), rounded(scores[int(p)])] for p in candidates[order].tolist()]


def explanation_parts(explanation) -> dict:
    """The per-token parts of one :class:`~mech_vqa.results.Explanation`: map, heads, head maps, layers."""
    positions, heads, layers = explanation.positions, explanation.heads, explanation.layers
    token = explanation.target.get("token", "")
    head_maps, texts = {}, {}
    for index, (layer, head) in enumerate(positions.heads):
        key = f"{int(layer)},{int(head)}"
        head_maps[key] = rounded(positions.image_scores[index])
        texts[key] = head_text(positions, index, positions.image_positions)
    top = heads.top_heads(1)[0]
    return {
        "maps": [map_entry(explanation.patch_map, "mechanistic")],
        "heads": {"scores": rounded(heads.scores), "unit": f"increase of log p({token!r}) (nats)", "top": list(top)},
        "head_maps": head_maps, "head_text": texts,
        "head_unit": f"position-level increase of log p({token!r}) (nats)",
        "layers": {"attention": rounded(layers.attention), "mlp": rounded(layers.mlp),
                   "final_logprob": round(float(layers.final_logprob), 4),
                   "unit": f"increase of log p({token!r}) (nats)"},
        "curves": [],
    }


def answer_tokens(str_tokens: list, answer: str | None, target_position: int | None) -> list[dict]:
    """The answer's tokens at the end of the sequence, found by matching the answer text; else the target alone.

    ``position`` is each token's predicting position (its sequence index - 1), as in ``Target``.
    """
    squeeze = (answer or "").replace(" ", "").lower()  # word-level tokenizers may lower-case
    tokens = [str(t) for t in str_tokens or []]
    if squeeze and tokens:
        text = ""
        for start in range(len(tokens) - 1, -1, -1):
            text = clean_token(tokens[start]).replace(" ", "").lower() + text
            if text == squeeze:
                return [{"text": clean_token(tokens[i]), "position": i - 1, "computed": False}
                        for i in range(start, len(tokens))]
            if len(text) > len(squeeze):
                break
    if target_position is None or target_position + 1 >= len(tokens):
        return []
    return [{"text": clean_token(tokens[target_position + 1]), "position": target_position, "computed": False}]


def model_label(name: str) -> str:
    """A model's name for the page: a hub id as it is, a local folder by its last part (no home paths in exports)."""
    from pathlib import PurePath

    name = str(name or "")
    return PurePath(name).name if name.startswith(("/", "~", ".")) or "\\" in name or name.count("/") > 1 else name


def base_payload(kind: str, title: str, *, info: dict | None = None, model: str = "", image=None, box=None) -> dict:
    info = info or {}
    return {"kind": kind, "title": title, "question": info.get("question") or "", "answer": info.get("answer") or "",
            "model": model_label(model or info.get("model") or ""), "image": image_uri(image),
            "box": [round(float(v), 2) for v in box] if box is not None else None,
            "tokens": [], "selected": 0, "per_token": {}, "lens": None, "ablation": None, "table": None,
            "notes": []}


def _select_token(payload: dict, target: dict) -> str:
    """Mark ``target``'s token computed (adding it when missing) and return its key in ``per_token``."""
    position = int(target.get("position", -1))
    for index, token in enumerate(payload["tokens"]):
        if token["position"] == position:
            token["computed"] = True
            payload["selected"] = index
            return str(index)
    payload["tokens"].append({"text": clean_token(target.get("token", "")), "position": position, "computed": True})
    payload["selected"] = len(payload["tokens"]) - 1
    return str(payload["selected"])


# ------------------------------------------------------------------------- one per result type
def explanation_payload(explanation) -> dict:
    positions = explanation.positions
    info = {**positions.info, "model": explanation.heads.model}
    payload = base_payload("Explanation", "mechanistic explanation", info=info, image=positions.image,
                           box=explanation.patch_map.box)
    payload["tokens"] = answer_tokens(positions.str_tokens, info.get("answer"), explanation.target.get("position"))
    key = _select_token(payload, explanation.target)
    payload["per_token"][key] = explanation_parts(explanation)
    return payload


def patch_map_payload(patch_map) -> dict:
    payload = base_payload("PatchMap", f"{patch_map.method} map", info=patch_map.info, image=patch_map.image,
                           box=patch_map.box)
    for target in patch_map.targets or [{"token": "", "position": -1}]:
        key = _select_token(payload, target)
        payload["per_token"][key] = {"maps": [map_entry(patch_map)]}
    payload["selected"] = 0
    return payload


def comparison_payload(comparison) -> dict:
    first = next(iter(comparison.maps.values()), None)
    info = {**(first.info if first is not None else {}), **comparison.info}
    payload = base_payload("Comparison", "comparison of patch-importance methods", info=info,
                           image=first.image if first is not None else None, box=first.box if first is not None else None)
    targets = comparison.info.get("targets") or (first.targets if first is not None else [])
    rows = {row["method"]: row for row in comparison.table}
    maps = []
    for name, patch_map in comparison.maps.items():
        row = rows.get(name, {})
        maps.append(map_entry(patch_map, name, {key: row.get(key) for key in (
            "insertion_auc", "deletion_auc", "insertion_auc_raw", "deletion_auc_raw", "pointing_game", "in_box_share",
            "runtime_s") if row.get(key) is not None}))
    label = " ".join(clean_token(t.get("token", "")) for t in targets) or "(no token)"
    payload["tokens"] = [{"text": label, "position": int(targets[0]["position"]) if targets else -1,
                          "computed": True}]
    payload["per_token"]["0"] = {"maps": maps}
    if len(targets) > 1:
        payload["notes"].append(f"every map explains the {len(targets)} tokens {label} together (mean of their maps)")
    payload["table"] = [{key: (round(value, 4) if isinstance(value, float) and math.isfinite(value) else
                               (None if isinstance(value, float) else value))
                         for key, value in row.items() if not isinstance(value, (list, dict))}
                        for row in comparison.table]
    return payload


def lens_part(lens, k: int | None = None) -> dict:
    """The logit lens for the page: per stage, each cell's top-k ``[[word, prob], ...]`` and the word's map."""
    stages, n_patches, top_k = lens.top_ids.shape
    k = min(k or top_k, top_k)
    rows, cols = (lens.grid if lens.view == 0 else lens.image_size)
    cells = [[[[] for _ in range(cols)] for _ in range(rows)] for _ in range(stages)] if lens.view == 0 else None
    words = []
    for stage in range(stages):
        probs = rounded(lens.top_probs[stage, :, :k], 3)
        stage_words = []
        for i in range(n_patches):
            names = lens.top_tokens[stage][i][:k] if lens.top_tokens else [str(int(t)) for t in lens.top_ids[stage, i, :k]]
            stage_words.append([[clean_token(w), p] for w, p in zip(names, probs[i])])
        words.append(stage_words)
    rowcol = lens.rowcol.long().tolist()
    if cells is not None:
        for stage in range(stages):
            for i, (r, c) in enumerate(rowcol):
                cells[stage][r][c] = words[stage][i]
    part = {"stages": ["input"] + [f"L{i}" for i in range(stages - 1)], "grid": list(lens.grid),
            "cells": cells, "k": k, "word": lens.word,
            "word_maps": [rounded(lens._grid(lens.word_probs[s].float())) for s in range(stages)]
            if lens.word_probs is not None and lens.view == 0 else None}
    if cells is None:
        part["notes"] = "a later view's patches are not on the grid: the lens grid shows view 0 only"
    return part


def logit_lens_payload(lens, k: int | None = None) -> dict:
    payload = base_payload("LogitLens", "logit lens of the image tokens", info={**lens.info, "model": lens.model},
                           image=lens.image)
    payload["lens"] = lens_part(lens, k)
    if lens.word_probs is not None:
        key = _select_token(payload, {"token": lens.word, "position": -1})
        payload["per_token"][key] = {"maps": [map_entry(lens.patch_map(layer), f"logit lens after "
                                                        f"{'input' if layer == 'input' else 'layer ' + str(layer)}")
                                              for layer in [*range(lens.n_layers - 1, -1, -1), "input"]]}
    return payload


def ablation_part(result) -> dict:
    total = result.total
    part = {"names": list(result.names), "kinds": list(result.kinds), "layers": [int(v) for v in result.layers],
            "heads": [int(v) for v in result.heads], "total": rounded(total),
            "delta": rounded(result.delta), "flipped": [bool(v) for v in result.flipped.tolist()],
            "targets": [clean_token(t.get("token", "")) for t in result.targets],
            "clean_logprob": rounded(result.clean_logprob), "unit": "change of summed answer log-prob (nats)",
            "head_grid": None}
    if "head" in result.kinds and "n_layers" in result.info:
        part["head_grid"] = rounded(result.head_grid())
    return part


def ablation_payload(result) -> dict:
    payload = base_payload("AblationResult", "ablations: the answer's change", info=result.info)
    payload["tokens"] = [{"text": "all (summed)", "position": -1, "computed": True}] + [
        {"text": clean_token(t.get("token", "")), "position": int(t.get("position", -1)), "computed": True}
        for t in result.targets]
    payload["ablation"] = ablation_part(result)
    return payload


def igos_payload(result) -> dict:
    payload = patch_map_payload(result.to_patch_map())
    payload["kind"] = "IGOSResult"
    if result.fractions is not None:
        curve = curve_entry(result.method, result.fractions, result.deletion_curve, result.insertion_curve,
                            result.deletion_auc, result.insertion_auc)
        for part in payload["per_token"].values():
            part["curves"] = [curve]
    return payload


def insertion_deletion_payload(result) -> dict:
    payload = base_payload("InsertionDeletion", f"insertion / deletion curves of {result.method}")
    payload["tokens"] = [{"text": result.method or "map", "position": -1, "computed": True}]
    payload["per_token"]["0"] = {"curves": [curve_entry(result.method or "map", result.fractions, result.deletion,
                                                        result.insertion, result.deletion_auc,
                                                        result.insertion_auc, getattr(result, "flag", None),
                                                        raw=result)]}
    return payload


#: per-head maps are sent for every head of a model with at most this many; else for the top ones
HEAD_MAPS_MAX = 64
TOP_HEAD_MAPS = 16


def answer_attention_payload(result) -> dict:
    """Raw attention per target token: the mean map, the heads' attention mass on the image, each head's map."""
    first = {**result.info, "model": result.info.get("model", "")}
    payload = base_payload("AnswerAttention", "raw attention of the answer tokens", info=first, image=result.image,
                           box=result.box)
    image_weights = result.image_weights()  # [L, H, T, n_image]
    n_layers, n_heads = image_weights.shape[:2]
    mass = image_weights.sum(-1)  # [L, H, T]
    for t, target in enumerate(result.targets):
        key = _select_token(payload, target)
        token_mass = mass[:, :, t]
        if n_layers * n_heads <= HEAD_MAPS_MAX:
            chosen = [(li, h) for li in range(n_layers) for h in range(n_heads)]
        else:
            top = token_mass.flatten().topk(min(TOP_HEAD_MAPS, token_mass.numel())).indices.tolist()
            chosen = [divmod(i, n_heads) for i in top]
        head_maps = {f"{int(result.layers[li])},{h}": rounded(result.to_grid(image_weights[li, h, t]))
                     for li, h in chosen}
        best = divmod(int(token_mass.flatten().argmax()), n_heads)
        grid = torch.full((max(int(v) for v in result.layers) + 1, n_heads), float("nan"))
        grid[torch.as_tensor([int(v) for v in result.layers])] = token_mass
        payload["per_token"][key] = {
            "maps": [map_entry(result.patch_map(tokens=[t]), "raw_attention")],
            "heads": {"scores": rounded(grid), "unit": "attention mass on the image (0-1)",
                      "top": [int(result.layers[best[0]]), best[1]]},
            "head_maps": head_maps, "head_text": {}, "head_unit": "attention weight", "head_signed": False,
        }
    payload["selected"] = 0
    return payload


def relevancy_payload(result) -> dict:
    payload = base_payload("RelevancyMaps", "relevancy of the answer tokens", info=result.info, image=result.image,
                           box=result.box)
    for t, target in enumerate(result.targets):
        key = _select_token(payload, target)
        maps = [map_entry(result.patch_map([t], stage="llm"), "relevancy (LLM)")]
        if result.vision is not None:
            maps.append(map_entry(result.patch_map([t], stage="vision"), "relevancy (vision tower)"))
        payload["per_token"][key] = {"maps": maps}
    payload["selected"] = 0
    return payload


def payload_of(result) -> dict | None:
    """The page payload of a result, or None when the explorer has no linked view for its type."""
    from ..results import AblationResult, Explanation, IGOSResult, LogitLens, PatchMap

    if hasattr(result, "to_payload"):
        return result.to_payload()
    name = type(result).__name__
    if isinstance(result, Explanation):
        return explanation_payload(result)
    if isinstance(result, LogitLens):
        return logit_lens_payload(result)
    if isinstance(result, AblationResult):
        return ablation_payload(result)
    if isinstance(result, IGOSResult):
        return igos_payload(result)
    if isinstance(result, PatchMap):
        return patch_map_payload(result)
    if name == "AnswerAttention":
        return answer_attention_payload(result)
    if name == "RelevancyMaps":
        return relevancy_payload(result)
    if name == "Comparison":
        return comparison_payload(result)
    if name == "InsertionDeletion":
        return insertion_deletion_payload(result)
    return None
