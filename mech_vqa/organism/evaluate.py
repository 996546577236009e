"""Score the organism -- and patch-importance methods against its known answer regions.

``evaluate(model, processor, n=500, seed=..., min_objects=2, methods=None)`` reports

* answer accuracy (argmax at the answer word after teacher-forcing the answer prefix), overall,
  by number of objects and by question family;
* for each ``methods[name]`` -- a callable ``(model, processor, item) -> 2-D tensor`` over the
  patch grid (rows x cols) -- two localisation scores against the answer object's box:

  - ``pointing_game``: the expected hit over tied maxima (share of the peak cells whose patch
    centre lies inside the box; 1 or 0 for a unique peak), averaged over the maps that have a
    peak; constant maps point nowhere and are counted in ``uninformative`` instead;
  - ``inside_share``: sum of positive importance in cells whose centre is inside the box divided
    by the sum of all positive importance (0 when a map has no positive value), averaged.

  ``chance`` is the mean fraction of cells whose centre is inside the box: what a uniformly
  random map scores on both, on average.

CLI: ``python -m mech_vqa.organism.evaluate --n 100 [--model DIR] [--generate]``;
``--write-eval-split`` (re)writes the fixed evaluation split ``data/eval`` from its seed.
"""

from __future__ import annotations

import argparse
import json
import zlib
from collections import defaultdict
from collections.abc import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from mech_vqa.results import PatchMap

from mech_vqa.organism.model import predict_answer_words, prompt
from mech_vqa.organism.synthetic import VQAItem, generate_items

TEST_SEED = 4242  # held out: training batches use seeds [train_seed, step], validation uses 777


def patch_grid(model, processor) -> tuple[int, int, int]:
    """(rows, cols, patch size in pixels) of the model's square image grid."""
    patch = model.config.vision_config.patch_size
    size = model.config.vision_config.image_size
    return size // patch, size // patch, patch


def cells_in_box(box, rows: int, cols: int, patch: int) -> torch.Tensor:
    """Bool (rows, cols): is the cell's centre inside ``box`` = (x0, y0, x1, y1), x1/y1 exclusive?

    The same rule as :meth:`mech_vqa.results.PatchMap.inside_box`, which scores the maps.
    """
    return PatchMap(scores=torch.zeros(rows, cols), image_size=[rows * patch, cols * patch], box=list(box)).inside_box()


def localisation_scores(heatmap: torch.Tensor, box, patch: int) -> tuple[float | None, float]:
    """(expected hit over tied peaks -- None for a constant map --, positive share inside the box)
    for one ``rows x cols`` map."""
    heatmap = torch.as_tensor(heatmap, dtype=torch.float32).detach().cpu()
    rows, cols = heatmap.shape
    patch_map = PatchMap(scores=heatmap, image_size=[rows * patch, cols * patch], box=list(box))
    return patch_map.pointing_game(), patch_map.in_box_share()


@torch.no_grad()
def greedy_answers(model, processor, items: list[VQAItem], max_new_tokens: int = 12) -> list[str]:
    """Full greedy answers (decoded, lower case), one item at a time."""
    answers = []
    for it in items:
        batch = processor(text=[prompt(it.question)], images=[it.image], return_tensors="pt")
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(processor.tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def evaluate(model, processor, n: int = 500, seed: int = TEST_SEED, min_objects: int = 2, max_objects: int = 4,
             methods: dict[str, Callable] | None = None, items: list[VQAItem] | None = None,
             generate: bool = False) -> dict:
    """Accuracy (and method localisation) on ``items`` or ``n`` fresh items from ``seed``."""
    model.eval()
    if items is None:
        items = generate_items(n, seed=seed, min_objects=min_objects, max_objects=max_objects)
    words = predict_answer_words(model, processor, items)
    groups = defaultdict(list)
    for it, word in zip(items, words):
        ok = word == it.answer_word.lower()
        for key in ("all", f"objects={it.n_objects}", f"family={it.family}"):
            groups[key].append(ok)
    result = {"n": len(items), "accuracy": float(np.mean(groups.pop("all")))}
    result["by_group"] = {k: {"accuracy": float(np.mean(v)), "n": len(v)} for k, v in sorted(groups.items())}
    if generate:
        answers = greedy_answers(model, processor, items)
        result["exact_match"] = float(np.mean([a.strip() == it.answer.lower() for a, it in zip(answers, items)]))
    rows, cols, patch = patch_grid(model, processor)
    insides = [cells_in_box(it.box, rows, cols, patch) for it in items]
    result["chance"] = float(np.mean([m.float().mean().item() for m in insides]))
    result["methods"] = {}
    for name, method in (methods or {}).items():
        maps = [method(model, processor, it) for it in tqdm(items, desc=name, leave=False)]
        if any(tuple(m.shape) != (rows, cols) for m in maps):
            raise ValueError(f"method {name!r} must return a {rows}x{cols} map over the patch grid")
        scores = [localisation_scores(m, it.box, patch) for m, it in zip(maps, items)]
        pointing = [s[0] for s in scores if s[0] is not None]
        result["methods"][name] = {
            "pointing_game": float(np.mean(pointing)) if pointing else None,
            "inside_share": float(np.mean([s[1] for s in scores])),
            "uninformative": len(scores) - len(pointing),
        }
    return result


def answer_attention(layer: int = 2, head: int = 0) -> Callable:
    """A reference method: one text-model head's attention from the answer position to the patches.

    The default (layer 2, head 0) is the head the training scaffold pulled onto the answer object,
    so it should score near the top; it shows how a method plugs into :func:`evaluate`.
    """
    @torch.no_grad()
    def method(model, processor, item: VQAItem) -> torch.Tensor:
        from mech_vqa.capture import trace
        from mech_vqa.organism.model import encode

        batch = encode(processor, [item], with_answer=False)
        answer_position = batch["input_ids"].shape[1] - 1
        with trace(model, None, ["pattern"], layers=[layer], positions=[answer_position]) as cache:
            model(**batch)
        attn = cache["pattern", layer][0, head, 0]
        rows, cols, _ = patch_grid(model, processor)
        return attn[batch["input_ids"][0] == model.config.image_token_id].reshape(rows, cols)

    return method


@torch.no_grad()
def head_ablation_accuracy(model, processor, items: list[VQAItem]) -> dict[str, float]:
    """Answer accuracy on ``items`` with each text-model head zero-ablated in turn.

    Keys: ``"clean"`` and ``"L{layer}H{head}"`` (that head's output before ``o_proj`` set to zero at
    every position). Which heads the answer needs shows whether a retrieval head emerged.
    """
    from mech_vqa.adapters import get_adapter
    from mech_vqa.hooks import HookSet
    from mech_vqa.interventions import register_interventions, zero_head
    from mech_vqa.organism.model import encode

    model.eval()
    adapter = get_adapter(model)
    batch = encode(processor, items, with_answer=False)
    gold = torch.tensor(processor.tokenizer.convert_tokens_to_ids([it.answer_word.lower() for it in items]))

    def accuracy(interventions) -> float:
        hooks = HookSet()
        try:
            register_interventions(hooks, adapter, interventions)
            predicted = model(**batch).logits[:, -1].argmax(-1)
        finally:
            hooks.remove()
        return float((predicted == gold).float().mean())

    result = {"clean": accuracy([])}
    for layer in range(adapter.n_layers):
        for head in range(adapter.n_heads):
            result[f"L{layer}H{head}"] = accuracy([zero_head(layer, head)])
    return result


def library_method(name: str, **options) -> Callable:
    """A method of :data:`mech_vqa.compare.METHODS` as an evaluation method.

    It explains the answer word (teacher-forced full answer, the word's token as target) and
    returns the map on the patch grid (finer maps, like iGOS's mask, are area-averaged onto it).
    """
    from mech_vqa.compare import METHODS
    from mech_vqa.model import VQAModel
    from mech_vqa.tasks import answer_target

    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {sorted(METHODS)}")
    wrapped: dict[int, VQAModel] = {}

    def method(model, processor, item: VQAItem) -> torch.Tensor:
        vqa = wrapped.setdefault(id(model), VQAModel(model, processor, name="organism"))
        inp = vqa.prepare(item.image, item.question, item.answer)
        target = inp.target(answer_target(inp, {"answer_word": item.answer_word}))
        patch_map = METHODS[name](vqa, inp, [target], inp.box_to_model(item.box), {"baseline": "blur", **options})
        grid = inp.geometry.grid
        return patch_map.scores if patch_map.grid == tuple(grid) else patch_map.resample(grid, mode="area")

    method.__name__ = name
    return method


def random_map(model, processor, item: VQAItem) -> torch.Tensor:
    """A chance baseline: i.i.d. uniform scores, seeded by the question and box."""
    rows, cols, _ = patch_grid(model, processor)
    generator = torch.Generator().manual_seed(zlib.crc32(f"{item.question}{item.box}".encode()))
    return torch.rand(rows, cols, generator=generator)


def format_report(result: dict) -> str:
    """A small plain-text table of :func:`evaluate`'s result."""
    lines = [f"items: {result['n']}  accuracy: {result['accuracy']:.3f}"]
    if "exact_match" in result:
        lines.append(f"greedy exact match: {result['exact_match']:.3f}")
    lines += [f"  {k:<16} {v['accuracy']:.3f}  (n={v['n']})" for k, v in result["by_group"].items()]
    lines.append(f"chance localisation (box cell fraction): {result['chance']:.3f}")
    for name, s in result["methods"].items():
        pointing = "  n/a" if s["pointing_game"] is None else f"{s['pointing_game']:.3f}"
        lines.append(f"  {name:<16} pointing {pointing}  inside share {s['inside_share']:.3f}"
                     f"  uninformative (constant) maps {s.get('uninformative', 0)}/{result['n']}")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description="Evaluate the organism on fresh synthetic questions.")
    p.add_argument("--n", type=int, default=500)
    p.add_argument("--seed", type=int, default=TEST_SEED)
    p.add_argument("--min-objects", type=int, default=2)
    p.add_argument("--model", default=None, help="directory with a saved model (default: the shipped organism)")
    p.add_argument("--organism", default="scaffolded", choices=["scaffolded", "free"],
                   help="which shipped organism when no --model: 'scaffolded' (data/organism, default) or 'free' "
                        "(data/organism_free, trained without the attention scaffold)")
    p.add_argument("--generate", action="store_true", help="also score full greedy answers")
    p.add_argument("--json", action="store_true", help="print the raw result as JSON")
    p.add_argument("--methods", nargs="?", const="all", default=None,
                   help="also score patch-importance methods: 'all' (every library method plus the random and "
                        "scaffolded-head references) or a comma-separated list")
    p.add_argument("--eval-split", action="store_true", help="score the fixed split in data/eval instead")
    p.add_argument("--write-eval-split", action="store_true", help="regenerate data/eval and exit")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch (default 2)")
    args = p.parse_args(argv)
    from mech_vqa.organism import EVAL_DIR, load_eval_split, load_organism, write_eval_split

    if args.write_eval_split:
        print(f"wrote {len(write_eval_split(EVAL_DIR))} items to {EVAL_DIR}")
        return
    torch.set_num_threads(args.threads)

    model, processor = load_organism(args.model, variant=args.organism)
    items = load_eval_split(EVAL_DIR) if args.eval_split else None
    methods = None
    if args.methods:
        from mech_vqa.compare import DEFAULT_METHODS

        names = list(DEFAULT_METHODS) if args.methods == "all" else args.methods.split(",")
        scaffolded = args.model is None and args.organism == "scaffolded"
        methods = {"random": random_map,
                   f"attention L2H0 ({'scaffolded' if scaffolded else 'not scaffolded'})": answer_attention(2, 0)}
        methods.update({name: library_method(name) for name in names})
    result = evaluate(model, processor, n=args.n, seed=args.seed, min_objects=args.min_objects, items=items,
                      generate=args.generate, methods=methods)
    print(json.dumps(result, indent=1) if args.json else format_report(result))


if __name__ == "__main__":
    main()
