"""The README's main job: answer a question about a shipped image and explain the answer.

Writes into ``out_dir``: one heatmap per patch-importance method over the image the model saw with
the ground-truth answer region drawn (``<method>.png``), all of them side by side
(``comparison.png``), the mechanistic layer and head attributions (``layers.png``, ``heads.png``),
and ``scores.json`` with the answer, the explained tokens and every method's scores.
"""

from __future__ import annotations

import json
from pathlib import Path


def default_item() -> dict:
    """The first item of the shipped evaluation split (image path made absolute)."""
    from .organism import EVAL_DIR

    rows = [json.loads(line) for line in (EVAL_DIR / "items.jsonl").read_text().splitlines() if line.strip()]
    row = dict(rows[0])
    row["image"] = str(EVAL_DIR / row["image"])
    return row


def run_demo(vqa, out_dir="out/demo", image=None, question=None, methods=None, options=None, view: int = 0) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from .compare import compare
    from .methods.mechanistic import explain

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    row = default_item() if image is None else {"image": str(image), "question": question}
    question = question or row["question"]
    with Image.open(row["image"]) as handle:
        picture = handle.convert("RGB")
    prediction = vqa.generate(picture, question)
    inp = vqa.prepare(picture, question, prediction or None, generate=False)
    box = inp.box_to_model(row["box"]) if row.get("box") else None
    comparison = compare(vqa, inp, methods=methods, box=box, progress=True, options=options, view=view)

    scores = {"model": vqa.name, "image": row["image"], "question": question, "prediction": prediction,
              "expected": row.get("answer"), "box": box, "targets": comparison.info["targets"],
              "selection_rule": comparison.info["selection_rule"], "methods": {}, "correlations": comparison.correlations}
    for entry in comparison.table:
        name = entry["method"]
        path = out / f"{name.replace('+', 'p')}.png"
        fig, _ = comparison.maps[name].plot()
        fig.savefig(path, dpi=130, bbox_inches="tight")
        plt.close(fig)
        scores["methods"][name] = {**{k: v for k, v in entry.items() if k != "method"}, "png": str(path)}
    fig, _ = comparison.plot()
    fig.savefig(out / "comparison.png", dpi=110, bbox_inches="tight")
    plt.close(fig)

    target = comparison.info["targets"][0]
    explanation = explain(vqa, inp, inp.target(position=target["position"]), box=box, view=view, progress=False)
    for name, result in (("layers", explanation.layers), ("heads", explanation.heads)):
        fig, _ = result.plot()
        fig.savefig(out / f"{name}.png", dpi=130, bbox_inches="tight")
        plt.close(fig)
    scores["top_heads"] = explanation.heads.topk(5).to_dict("records")
    from .results.base import dumps_strict

    (out / "scores.json").write_text(dumps_strict(scores, indent=1))  # NaN -> null, listed under "non_finite"
    return scores
