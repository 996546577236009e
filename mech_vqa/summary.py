"""The dataset table: aggregate a results file written by :func:`mech_vqa.dataset.run_dataset`.

Per task it reports what the rows hold: accuracy for every task; for ``ablate`` the mean head
ablation grid, block effects and the object-vs-other patch ablation; for ``compare`` (over the
items that have visually relevant tokens, as Xing et al. 2025 do) per-method means of insertion /
deletion AUC, pointing game, in-box share and runtime, the mean Spearman
correlation between methods, and accuracy split by whether each method's focus hits the box.
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
    # Xing et al. skip items with no visually relevant token: their curves normalise by s(I) - s(B) ~ 0
    compare = [r for r in compared if not str(r.get("selection_rule", "")).startswith("fallback")]
    if compared:
        tables["overview"]["compared_with_S"] = len(compare)
        tables["overview"]["no_relevant_token"] = len(compared) - len(compare)
    if compare:
        names = sorted({m for r in compare for m in r["methods"]})
        records = []
        for name in names:
            entries = [r["methods"][name] for r in compare if name in r["methods"] and "error" not in r["methods"][name]]
            hits = [r for r in compare if r["methods"].get(name, {}).get("pointing_game") is True]
            misses = [r for r in compare if r["methods"].get(name, {}).get("pointing_game") is False]
            records.append({
                "method": name, "items": len(entries),
                "insertion_auc": _mean(e.get("insertion_auc") for e in entries),
                "deletion_auc": _mean(e.get("deletion_auc") for e in entries),
                "pointing_game": _mean(e.get("pointing_game") for e in entries),
                "in_box_share": _mean(e.get("in_box_share") for e in entries),
                "runtime_s": _mean(e.get("runtime_s") for e in entries),
                "acc_focus_hit": _mean(r.get("correct") for r in hits),
                "acc_focus_miss": _mean(r.get("correct") for r in misses),
            })
        tables["methods"] = pd.DataFrame(records)
        pairs = sorted({p for r in compare for p in r.get("correlations", {})})
        tables["correlations"] = pd.DataFrame([
            {"pair": pair, "mean_spearman": _mean(r.get("correlations", {}).get(pair) for r in compare)}
            for pair in pairs])
    return tables


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


# the methods figure's metrics: column, axis label (which direction is better)
_METRICS = (("insertion_auc", "insertion AUC (higher is better)"), ("deletion_auc", "deletion AUC (lower is better)"),
            ("pointing_game", "pointing game (higher is better)"), ("in_box_share", "in-box share (higher is better)"))


def save_figures(tables: dict, folder: Path) -> list[Path]:
    """``head_ablation.png`` (ablate results) and ``methods.png`` (compare results) in ``folder``;
    nothing (and no folder) when the tables hold neither."""
    import matplotlib.pyplot as plt
    import torch

    from .plotting import PALETTE, heatmap

    written = []
    if "head_delta" not in tables and "methods" not in tables:
        return written
    folder.mkdir(parents=True, exist_ok=True)
    if "head_delta" in tables:
        items = int(tables["image_ablation"]["items"].max()) if len(tables.get("image_ablation", [])) else None
        fig, _ = heatmap(torch.tensor(tables["head_delta"]), xlabel="head", ylabel="decoder layer",
                         title="mean change of the answer's log-prob when one head is ablated"
                               + (f" ({items} items)" if items else ""),
                         cbar_label="mean change of answer log-prob (nats)")
        written.append(folder / "head_ablation.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    if "methods" in tables:
        frame = tables["methods"]
        fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(frame) + 2.5), 3.8))
        x = np.arange(len(frame))
        width = 0.8 / len(_METRICS)
        for index, (column, label) in enumerate(_METRICS):
            offset = (index - (len(_METRICS) - 1) / 2) * width
            bars = ax.bar(x + offset, frame[column], width=width, label=label, color=PALETTE[index],
                          hatch="//" if column == "deletion_auc" else None, edgecolor="white", linewidth=0.5)
            ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)  # a zero bar is otherwise invisible
        ax.set_xticks(x, [f"{m}\n({n} items)" for m, n in zip(frame["method"], frame["items"])], fontsize=8)
        ax.set_ylabel("score (0 to 1)")
        ax.set_ylim(0, 1.1)
        ax.grid(axis="y", linewidth=0.4, alpha=0.5)
        ax.set_axisbelow(True)
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.set_title("patch-importance methods, mean over the items with visually relevant answer tokens", fontsize=9)
        written.append(folder / "methods.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return written
