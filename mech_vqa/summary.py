"""The dataset table: aggregate a results file written by :func:`mech_vqa.dataset.run_dataset`.

Per task it reports what the rows hold: accuracy for every task; for ``ablate`` the mean head
ablation grid, block effects and the object-vs-other patch ablation; for ``knockout`` the mean
and median relative change of the answer's probability per blocked pair and window (``knockout`` table
and figure); for ``compare``, per method:

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

:func:`write_tables` saves every table as CSV, as parquet when pyarrow is installed (the
``tables`` extra), and all of them in one strict-JSON ``summary.json`` (NaN written as null).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .dataset import read_results_file


def _finite(values) -> list[float]:
    return [float(v) for v in values if v is not None and not (isinstance(v, float) and np.isnan(v))]


def _mean(values) -> float:
    values = _finite(values)
    return float(np.mean(values)) if values else float("nan")


def _median(values) -> float:
    values = _finite(values)
    return float(np.median(values)) if values else float("nan")


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
    knocked = [r for r in ok if "knockout" in r]
    if knocked:
        tables["knockout"] = _knockout_table(knocked)
    explained = [r for r in ok if "layer_attn_increase" in r]
    if explained:
        attn = np.array([r["layer_attn_increase"] for r in explained], dtype=float)
        mlp = np.array([r["layer_mlp_increase"] for r in explained], dtype=float)
        tables["layers"] = pd.DataFrame({"layer": np.arange(attn.shape[1]), "mean_attn_increase": attn.mean(0),
                                         "mean_mlp_increase": mlp.mean(0), "items": len(explained)})
        tops = [(h["layer"], h["head"]) for r in explained for h in r.get("top_heads", [])[:1]]
        counted = {head: tops.count(head) for head in set(tops)}
        tables["top_head"] = pd.DataFrame(
            [{"layer": layer, "head": head, "items_top": n, "share": n / len(explained)}
             for (layer, head), n in sorted(counted.items(), key=lambda kv: (-kv[1], kv[0]))])
        tables["overview"]["pointing_game"] = _mean(r.get("pointing_game") for r in explained)
        tables["overview"]["in_box_share"] = _mean(r.get("in_box_share") for r in explained)
    patched = [r for r in ok if "head_fraction" in r]
    if patched:
        tables.update(_patch_tables(patched))
        tables["overview"]["patch_pointing_game"] = _mean(r.get("pointing_game") for r in patched)
        tables["overview"]["patch_in_box_share"] = _mean(r.get("in_box_share") for r in patched)
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


def _knockout_table(rows: list[dict]):
    """Mean and median relative change of the answer's probability per (pair, window) over the knockout
    rows. The median beside the mean: one item the model answers wrongly (a clean probability near 0) can
    multiply its probability when edges are blocked and swing the mean on its own."""
    import pandas as pd

    records = {}
    for row in rows:
        study = row["knockout"]
        for p, pair in enumerate(study["pairs"]):
            for w, (window, layer) in enumerate(zip(study["windows"], study["layers"])):
                key = (pair, layer, tuple(window))
                records.setdefault(key, []).append(study["relative_change"][p][w])
    return pd.DataFrame([
        {"pair": pair, "layer": layer, "window_start": window[0], "window_stop": window[1],
         "mean_relative_change": _mean(values), "median_relative_change": _median(values), "items": len(values)}
        for (pair, layer, window), values in records.items()])


def _patch_tables(rows: list[dict]) -> dict:
    """Mean restored fraction per layer of each group of positions and of the MLP, and per head (patch rows;
    rows whose corruption left nothing to restore have NaN fractions and drop out of the means)."""
    import pandas as pd

    def mean_of(lists) -> np.ndarray:
        values = np.array([[np.nan if v is None else v for v in line] for line in lists], dtype=float)
        with np.errstate(all="ignore"):
            return np.nanmean(values, axis=0) if len(values) else values

    n_layers = len(rows[0]["mlp_fraction"])
    layers = pd.DataFrame({"layer": np.arange(n_layers)})
    labels = [label for label in ("image", "object", "question", "answer")
              if any(label in r.get("group_fraction", {}) for r in rows)]
    for label in labels:
        layers[label] = mean_of([r["group_fraction"][label] for r in rows if label in r.get("group_fraction", {})])
    layers["mlp"] = mean_of([r["mlp_fraction"] for r in rows])
    layers["items"] = sum(r.get("flag") is None for r in rows)
    heads = mean_of([np.asarray(r["head_fraction"], dtype=float).ravel().tolist() for r in rows])
    n_heads = len(rows[0]["head_fraction"][0])
    head_table = pd.DataFrame({"layer": np.arange(heads.size) // n_heads, "head": np.arange(heads.size) % n_heads,
                               "mean_fraction": heads}).sort_values("mean_fraction", ascending=False).head(10)
    return {"patch_layers": layers, "patch_heads": head_table.reset_index(drop=True)}


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


def summarize(results_path, figures: str | None = None, tables_dir: str | None = None) -> str:
    """The printed dataset table; with ``figures``, also PNG figures in that folder; with
    ``tables_dir``, every table as CSV (and parquet when pyarrow is installed) plus ``summary.json``."""
    header, rows = read_results_file(results_path)
    tables = summary_tables(rows)
    parts = []
    if header is not None:
        parts.append(f"task {header.get('task')}, model {header.get('model', {}).get('name')} "
                     f"({header.get('model', {}).get('dtype')}), options {header.get('options')}")
    for name, table in tables.items():
        if name == "head_delta":
            continue
        parts.append(f"## {name}\n{table.to_string(index=False, float_format=lambda v: f'{v:.3f}')}")
    if tables_dir:
        written, note = write_tables(tables, Path(tables_dir), header)
        parts.append("tables: " + ", ".join(str(p) for p in written) + (f"\n{note}" if note else ""))
    if figures:
        written = save_figures(tables, Path(figures))
        parts.append("figures: " + ", ".join(str(p) for p in written) if written else
                     "figures: none apply to these results (head ablation, layer and method figures need "
                     "ablate, explain or compare rows); no folder written")
    return "\n\n".join(parts)


def _frames(tables: dict) -> dict:
    """Every table as a DataFrame (the head-ablation grid as layer rows, one column per head)."""
    import pandas as pd

    out = {}
    for name, table in tables.items():
        if name == "head_delta":
            grid = np.asarray(table, dtype=float)
            table = pd.DataFrame(grid, columns=[f"head_{j}" for j in range(grid.shape[1])])
            table.insert(0, "layer", np.arange(grid.shape[0]))
        out[name] = table
    return out


def write_tables(tables: dict, folder: Path, header: dict | None = None) -> tuple[list[Path], str]:
    """Write ``<name>.csv`` for each table, ``<name>.parquet`` when pyarrow is installed, and
    ``summary.json`` (strict JSON, with the results header). Returns ``(paths, note)``; the note says
    why parquet was skipped, if it was."""
    from .results.base import dumps_strict

    folder.mkdir(parents=True, exist_ok=True)
    frames = _frames(tables)
    written = []
    for name, frame in frames.items():
        written.append(folder / f"{name}.csv")
        frame.to_csv(written[-1], index=False)
    note = ""
    try:
        import pyarrow  # noqa: F401
    except ImportError:
        note = ("parquet tables skipped: pyarrow is not installed; install it with "
                "`python3 -m pip install -e \".[tables]\"` (or `pip install pyarrow`)")
    else:
        for name, frame in frames.items():
            written.append(folder / f"{name}.parquet")
            frame.to_parquet(written[-1], index=False)
    written.append(folder / "summary.json")
    written[-1].write_text(dumps_strict({"header": header, "tables": {
        name: frame.to_dict("records") for name, frame in frames.items()}}, indent=1))
    return written, note


# the methods figure's metrics: column, axis label (which direction is better)
_METRICS = (("insertion_auc", "insertion AUC (higher is better)"), ("deletion_auc", "deletion AUC (lower is better)"),
            ("pointing_game", "pointing game (higher is better)"), ("in_box_share", "in-box share (higher is better)"))


def save_figures(tables: dict, folder: Path) -> list[Path]:
    """``head_ablation.png`` (ablate results), ``layers.png`` (explain results), ``knockout.png``
    (knockout results), ``patch_layers.png`` (patch results) and ``methods.png`` (compare results) in
    ``folder``; nothing (and no folder) when the tables hold none of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from .plotting import PALETTE, heatmap

    if not any(name in tables for name in ("head_delta", "methods", "layers", "knockout", "patch_layers")):
        return []
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if "layers" in tables:
        frame = tables["layers"]
        fig, ax = plt.subplots(figsize=(5, 3))
        x = frame["layer"].to_numpy()
        ax.bar(x - 0.2, frame["mean_attn_increase"], width=0.4, label="attention", color=PALETTE[0])
        ax.bar(x + 0.2, frame["mean_mlp_increase"], width=0.4, label="MLP", color=PALETTE[1])
        ax.axhline(0, color="0.5", lw=0.6)
        ax.set_xticks(x)
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("mean increase in answer log-prob (nats)")
        ax.legend(fontsize=7, frameon=False)
        ax.set_title(f"explain: what each layer adds to the answer word ({int(frame['items'].iloc[0])} items)",
                     fontsize=9)
        written.append(folder / "layers.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    if "head_delta" in tables:
        items = int(tables["image_ablation"]["items"].max()) if len(tables.get("image_ablation", [])) else None
        fig, _ = heatmap(torch.tensor(tables["head_delta"]), xlabel="head", ylabel="decoder layer",
                         title="mean change of the answer's log-prob when one head is ablated"
                               + (f" ({items} items)" if items else ""),
                         cbar_label="mean change of answer log-prob (nats)")
        written.append(folder / "head_ablation.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    if "knockout" in tables:
        frame = tables["knockout"]
        fig, ax = plt.subplots(figsize=(5.5, 3.5))
        for index, (pair, group) in enumerate(frame.groupby("pair", sort=False)):
            group = group.sort_values("layer")
            ax.plot(group["layer"], 100 * group["mean_relative_change"], marker="o", markersize=3,
                    color=PALETTE[index % len(PALETTE)], linestyle=("-", "--", "-.", ":")[index % 4], label=pair)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xticks(sorted(frame["layer"].unique()))
        ax.set_xlabel("layer (window centred on it)", fontsize=8)
        ax.set_ylabel("mean relative change of the\nanswer's probability (%)", fontsize=8)
        ax.legend(fontsize=7, title="blocked edges", title_fontsize=7)
        ax.set_title(f"attention knockout ({int(frame['items'].max())} items)", fontsize=9)
        written.append(folder / "knockout.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    if "patch_layers" in tables:
        frame = tables["patch_layers"]
        fig, ax = plt.subplots(figsize=(5.5, 3.2))
        columns = [c for c in ("image", "object", "question", "answer", "mlp") if c in frame]
        for index, column in enumerate(columns):
            ax.plot(frame["layer"], frame[column], marker="o", color=PALETTE[index % len(PALETTE)],
                    label="MLP output" if column == "mlp" else f"residual at {column} positions")
        ax.axhline(0, color="0.5", lw=0.6)
        ax.axhline(1, color="0.7", lw=0.6, ls="--")
        ax.set_xticks(frame["layer"])
        ax.set_xlabel("decoder layer (residual entering it; MLP output of it)")
        ax.set_ylabel("mean restored fraction")
        ax.legend(fontsize=7, frameon=False)
        ax.set_title(f"patch: what restores the answer ({int(frame['items'].iloc[0])} items)", fontsize=9)
        written.append(folder / "patch_layers.png")
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
