"""The dataset table: aggregate a results file written by :func:`mech_vqa.dataset.run_dataset`.

Per task it reports what the rows hold: accuracy for every task; for ``ablate`` the mean head
ablation grid, block effects and the object-vs-other patch ablation; for ``compare``, per method:

* normalised insertion / deletion AUC averaged over the items *kept* by the normalisation rule
  (``log s(I) - log s(B) >= min_gap``; ``auc_kept`` / ``auc_flagged`` count them; items explained
  through the fallback token are flagged as Xing et al. 2025 skip them), and the raw AUCs over
  every item;
* pointing game (expected hit over tied maxima) over the maps that point somewhere, with constant
  maps counted apart (``pointing_uninformative``), in-box share and runtime;
* accuracy split by focus, each item weighted by its pointing score (hit) and one minus it (miss);
* patch faithfulness (``faithfulness`` table): mean answer log-prob drop when each map's top-k
  cells are knocked out, beside random cells and the box's cells;
* head claims (``head_claims`` table): per head ranked first by the log-prob increase, how often,
  its mean increase, the mean change when it is zeroed and the flip rate; the mean Spearman
  correlation of the two rankings is in the overview;
* the mean Spearman correlation between methods' maps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .dataset import read_results


def _mean(values) -> float:
    values = [float(v) for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]
    return float(np.mean(values)) if values else float("nan")


def _ablation_table(rows: list[dict], key: str):
    """Mean log-prob change and flip rate of each named ablation listed under ``row[key]``."""
    import pandas as pd

    grouped: dict[str, list[dict]] = {}
    for row in rows:
        for entry in row.get(key, []):
            grouped.setdefault(entry["ablation"], []).append(entry)
    return pd.DataFrame([
        {"ablation": name, "mean_delta_logprob": _mean(e["delta_logprob"] for e in entries),
         "flip_rate": _mean(e["flipped"] for e in entries), "items": len(entries)}
        for name, entries in grouped.items()])


def summary_tables(rows: list[dict]) -> dict:
    """Plain-data tables (pandas DataFrames) from result rows."""
    import pandas as pd

    ok = [r for r in rows if r.get("status") == "ok"]
    correct = [r["correct"] for r in ok if r.get("correct") is not None]
    tables = {"overview": pd.DataFrame([{
        "items": len(rows), "ok": len(ok), "errors": len(rows) - len(ok),
        "accuracy": _mean(correct) if correct else float("nan"),
    }])}
    errors = [r for r in rows if r.get("status") == "error"]
    if errors:
        tables["errors"] = pd.DataFrame([{"id": r["id"], "error": r["error"]} for r in errors])
    ablate = [r for r in ok if "head_delta" in r]
    if ablate:
        tables["image_ablation"] = _ablation_table(ablate, "image_ablations")
        tables["blocks"] = _ablation_table(ablate, "blocks")
        tables["head_delta"] = np.nanmean(np.array([r["head_delta"] for r in ablate], dtype=float), axis=0)
    compared = [r for r in ok if "methods" in r]
    if compared:
        with_s = [r for r in compared if not str(r.get("selection_rule", "")).startswith("fallback")]
        tables["overview"]["compared"] = len(compared)
        tables["overview"]["compared_with_S"] = len(with_s)
        tables["overview"]["no_relevant_token"] = len(compared) - len(with_s)
        # the flag is per item (s(I), s(B) are the same for every map), so one entry decides
        tables["overview"]["auc_flagged_items"] = sum(not _kept(r, next(iter(r["methods"].values())))
                                                      for r in compared if r["methods"])
        tables["methods"] = _methods_table(compared)
        faithfulness = _faithfulness_table(compared)
        if faithfulness is not None:
            tables["faithfulness"] = faithfulness
        claims = [c for r in compared for c in (r.get("head_claims") or [])[:1]]
        if claims:
            tables["overview"]["head_claims_spearman"] = _mean(c.get("spearman") for c in claims)
            tables["head_claims"] = _head_claims_table(claims)
        pairs = sorted({p for r in compared for p in r.get("correlations", {})})
        tables["correlations"] = pd.DataFrame([
            {"pair": pair, "mean_spearman": _mean(r.get("correlations", {}).get(pair) for r in compared)}
            for pair in pairs])
    return tables


def _kept(row: dict, entry: dict) -> bool:
    """Whether a method entry's normalised AUCs may be averaged (rows written before the flag existed
    fall back to the selection rule: a fallback token was the one case of a negligible gap)."""
    if "auc_flag" in entry:
        return entry["auc_flag"] is None
    return not str(row.get("selection_rule", "")).startswith("fallback")


def _weighted_accuracy(pairs) -> float:
    pairs = [(float(w), float(c)) for w, c in pairs if w is not None and c is not None]
    total = sum(w for w, _ in pairs)
    return sum(w * c for w, c in pairs) / total if total > 0 else float("nan")


def _methods_table(compared: list[dict]):
    import pandas as pd

    names = sorted({m for r in compared for m in r["methods"]})
    records = []
    for name in names:
        pairs = [(r, r["methods"][name]) for r in compared
                 if name in r["methods"] and "error" not in r["methods"][name]]
        entries = [e for _, e in pairs]
        kept = [e for r, e in pairs if _kept(r, e)]
        pointing = [(e.get("pointing_game"), r.get("correct")) for r, e in pairs if "pointing_game" in e]
        informative = [(p, c) for p, c in pointing if p is not None]
        records.append({
            "method": name, "items": len(entries),
            "insertion_auc": _mean(e.get("insertion_auc") for e in kept),
            "deletion_auc": _mean(e.get("deletion_auc") for e in kept),
            "auc_kept": len(kept), "auc_flagged": len(entries) - len(kept),
            "insertion_auc_raw": _mean(e.get("insertion_auc_raw") for e in entries),
            "deletion_auc_raw": _mean(e.get("deletion_auc_raw") for e in entries),
            "pointing_game": _mean(p for p, _ in informative),
            "pointing_uninformative": len(pointing) - len(informative),
            "in_box_share": _mean(e.get("in_box_share") for e in entries),
            "runtime_s": _mean(e.get("runtime_s") for e in entries),
            "acc_focus_hit": _weighted_accuracy((p, c) for p, c in informative),
            "acc_focus_miss": _weighted_accuracy((1 - p, c) for p, c in informative),
        })
    return pd.DataFrame(records)


def _faithfulness_table(compared: list[dict]):
    """Mean knock-out drops per method (and of random cells and the box) for every mode and k."""
    import pandas as pd

    # in the order the rows hold them: per mode, k growing, the box's size last
    columns = list(dict.fromkeys(k for r in compared for e in r["methods"].values() for k in e
                                 if k.startswith("drop_")))
    if not columns:
        return None
    names = sorted({m for r in compared for m in r["methods"]})
    records = []
    for name in names:
        entries = [r["methods"][name] for r in compared if name in r["methods"] and "error" not in r["methods"][name]]
        records.append({"method": name, "items": len(entries),
                        **{c: _mean(e.get(c) for e in entries) for c in columns}})
    first = [next((e for e in r["methods"].values() if "error" not in e), {}) for r in compared]
    records.append({"method": "random cells", "items": len(first),
                    **{c: _mean(e.get(c.replace("drop_", "random_")) for e in first) for c in columns}})
    boxes = [(r.get("faithfulness") or {}).get("box") for r in compared]
    boxes = [b for b in boxes if b]
    if boxes:
        records.append({"method": "box", "items": len(boxes), **{c: _mean(b.get(c) for b in boxes) for c in columns}})
    return pd.DataFrame(records)


def _head_claims_table(claims: list[dict]):
    """Per head ranked first by the increase: count, mean increase, mean change when zeroed, flip rate."""
    import pandas as pd

    grouped: dict[str, list[dict]] = {}
    for claim in claims:
        if claim.get("heads"):
            grouped.setdefault(claim["heads"][0]["head"], []).append(claim["heads"][0])
    return pd.DataFrame([
        {"top_head": head, "items": len(entries), "mean_increase": _mean(e["increase"] for e in entries),
         "mean_delta_when_zeroed": _mean(e["delta_logprob"] for e in entries),
         "flip_rate": _mean(e["flipped"] for e in entries),
         "mean_rank_needed": _mean(e["rank_needed"] for e in entries)}
        for head, entries in sorted(grouped.items(), key=lambda item: -len(item[1]))])


def summarize(results_path, figures: str | None = None) -> str:
    """The printed dataset table; with ``figures``, also PNG figures in that folder."""
    rows = read_results(results_path)
    tables = summary_tables(rows)
    parts = []
    for name, table in tables.items():
        if name == "head_delta":
            continue
        parts.append(f"## {name}\n{table.to_string(index=False, float_format=lambda v: f'{v:.3f}')}")
    if figures:
        written = save_figures(tables, Path(figures))
        parts.append("figures: " + ", ".join(str(p) for p in written))
    return "\n\n".join(parts)


def save_figures(tables: dict, folder: Path) -> list[Path]:
    import matplotlib.pyplot as plt
    import torch

    from .plotting import heatmap

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if "head_delta" in tables:
        fig, _ = heatmap(torch.tensor(tables["head_delta"]), xlabel="head", ylabel="layer",
                         title="mean answer log-prob change, head ablated")
        written.append(folder / "head_ablation.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    if "methods" in tables:
        frame = tables["methods"]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        x = np.arange(len(frame))
        for offset, column in zip((-0.3, -0.1, 0.1, 0.3), ("insertion_auc", "deletion_auc", "pointing_game",
                                                            "in_box_share")):
            ax.bar(x + offset, frame[column], width=0.2, label=column)
        ax.set_xticks(x, frame["method"], rotation=30, ha="right")
        ax.legend(fontsize=7)
        ax.set_title("patch-importance methods over the dataset", fontsize=9)
        written.append(folder / "methods.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return written
