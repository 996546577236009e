"""The README's main job: answer a question about a shipped image and explain the answer.

Writes into ``out_dir``:

* ``image.png`` -- the image as it was given;
* one ``<method>.png`` per patch-importance method (name made file-safe by
  :func:`mech_vqa.plotting.file_stem`: ``igos++`` -> ``igos_plusplus.png``): the image beside the
  method's map over it, with the ground-truth answer region;
* ``comparison.png`` -- every method side by side with its scores;
* ``layers.png``, ``heads.png`` -- the mechanistic layer and head attributions;
* ``logit_lens_words.png`` -- each patch's top-1 word (logit lens) and a strip over the layers;
* ``scores.json`` -- the answer, the explained tokens and every method's scores (and PNG path).
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
    from PIL import Image

    from .compare import compare
    from .methods.logit_lens import logit_lens
    from .methods.mechanistic import explain
    from .plotting import file_stem

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
    picture.save(out / "image.png")
    figures = ["image.png"]
    for entry in comparison.table:
        name = entry["method"]
        path = out / f"{file_stem(name)}.png"
        fig, _ = comparison.maps[name].plot(label=name)
        _save(fig, path)
        scores["methods"][name] = {**{k: v for k, v in entry.items() if k != "method"}, "png": str(path)}
    _save(comparison.plot()[0], out / "comparison.png", dpi=110)

    target = inp.target(position=comparison.info["targets"][0]["position"])
    explanation = explain(vqa, inp, target, box=box, view=view, progress=False)
    for name, result in (("layers", explanation.layers), ("heads", explanation.heads)):
        _save(result.plot()[0], out / f"{name}.png")
    lens_layer = comparison.maps["logit_lens"].info.get("layer", -1) if "logit_lens" in comparison.maps else -1
    lens = logit_lens(vqa, inp, target.token_id, k=1, view=view)
    _save(lens.plot(layer=lens_layer)[0], out / "logit_lens_words.png")
    figures += [f"{file_stem(name)}.png" for name in scores["methods"]]
    figures += ["comparison.png", "layers.png", "heads.png", "logit_lens_words.png"]
    scores["figures"] = figures
    scores["top_heads"] = explanation.heads.topk(5).to_dict("records")
    from .results.base import dumps_strict

    (out / "scores.json").write_text(dumps_strict(scores, indent=1))  # NaN -> null, listed under "non_finite"
    return scores


def _save(fig, path, dpi: int = 130) -> None:
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
