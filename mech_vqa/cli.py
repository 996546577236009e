"""The ``mech-vqa`` command line.

    mech-vqa demo [--out DIR]                      explain a shipped question on the organism
    mech-vqa run TASK DATASET.jsonl --out R.jsonl  run a task over a dataset (resumable)
    mech-vqa summary R.jsonl [--figures DIR]       the dataset table and figures
    mech-vqa eval [--n N]                          the organism's accuracy and localisation scores
"""

from __future__ import annotations

import argparse
import json
import sys


def _load(model: str | None):
    from .model import VQAModel

    return VQAModel.organism() if model in (None, "organism") else VQAModel.from_pretrained(model)


def _demo(args) -> int:
    from .demo import run_demo

    scores = run_demo(_load(args.model), out_dir=args.out, image=args.image, question=args.question,
                      methods=args.methods.split(",") if args.methods else None, view=args.view)
    print(json.dumps({k: v for k, v in scores.items() if k != "methods"}, indent=1))
    for name, entry in scores["methods"].items():
        print(f"{name:>22}: {entry.get('png', entry.get('error'))}")
    return 0


def _run(args) -> int:
    from .dataset import read_dataset, run_dataset

    read_dataset(args.dataset)  # a missing or empty dataset fails before the model loads
    if args.view and args.task not in ("explain", "compare"):
        print(f"mech-vqa: --view applies to the explain and compare tasks, not {args.task}", file=sys.stderr)
        return 2
    extra = {"view": args.view} if args.view else {}
    counts = run_dataset(_load(args.model), args.dataset, args.out, args.task, limit=args.limit,
                         progress=not args.no_progress, **extra)
    print(json.dumps(counts))
    return 0


def _summary(args) -> int:
    from .summary import summarize

    print(summarize(args.results, figures=args.figures))
    return 0


def _eval(args) -> int:
    from .organism.evaluate import main as evaluate_main

    argv = ["--n", str(args.n), "--methods", args.methods, "--organism", args.organism]
    argv += ["--model", args.model] if args.model else []
    return evaluate_main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mech-vqa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = "hub id or local folder of a LLaVA model (default: the organism shipped in data/)"

    demo = sub.add_parser("demo", help="answer a question about a shipped image and write heatmaps + scores")
    demo.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    demo.add_argument("--model", default=None, help=model_help)
    demo.add_argument("--image", default=None, help="an image file (default: the first evaluation item)")
    demo.add_argument("--question", default=None, help="the question (default: the item's)")
    demo.add_argument("--methods", default=None, help="comma-separated patch methods (default: all)")
    demo.add_argument("--view", type=int, default=0,
                      help="1: draw a tiled model's high-resolution tokens (LLaVA-NeXT / OneVision); default 0")
    demo.set_defaults(func=_demo)

    from .tasks import TASKS

    run = sub.add_parser("run", help="run a task over a JSONL dataset, appending one row per item (resumable)")
    run.add_argument("task", choices=sorted(TASKS))
    run.add_argument("dataset", help='JSONL rows {"image", "question", "answer"?, "answer_word"?, "box"?}')
    run.add_argument("--out", required=True, help="results JSONL file (appended; rerun to resume)")
    run.add_argument("--model", default=None, help=model_help)
    run.add_argument("--limit", type=int, default=None, help="only the first N rows")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--view", type=int, default=0,
                     help="explain/compare: which image view the maps show (0 = the whole image's grid; 1 = a "
                          "tiled model's high-resolution tokens, LLaVA-NeXT / OneVision)")
    run.set_defaults(func=_run)

    summary = sub.add_parser("summary", help="print the dataset table of a results file and save its figures")
    summary.add_argument("results")
    summary.add_argument("--figures", default=None, help="folder for the figures")
    summary.set_defaults(func=_summary)

    evaluate = sub.add_parser("eval", help="organism accuracy and localisation of every patch method")
    evaluate.add_argument("--n", type=int, default=100)
    evaluate.add_argument("--model", default=None, help="a saved organism folder (default: data/organism)")
    evaluate.add_argument("--organism", default="scaffolded", choices=["scaffolded", "free"],
                          help="shipped organism to score when no --model (default scaffolded; free: no attention "
                               "scaffold)")
    evaluate.add_argument("--methods", default="all", help="comma-separated patch methods (default: all)")
    evaluate.set_defaults(func=_eval)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError) as err:
        print(f"mech-vqa: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
