"""The ``mech-vqa`` command line.

    mech-vqa demo [--out DIR]                      explain a shipped question on the organism
    mech-vqa run TASK DATASET.jsonl --out R.jsonl  run a task over a dataset (resumable)
    mech-vqa merge R.shard-*-of-*.jsonl --out R.jsonl   join the shards of a sharded run
    mech-vqa summary R.jsonl [--figures DIR]       the dataset table, its CSV / parquet tables, figures
    mech-vqa eval [--n N]                          the organism's accuracy and localisation scores
    mech-vqa explore [--port P]                    a local web app: ask, click tokens and heads, knock out

Commands that load a model take --model, --device, --dtype and --threads. This module imports
only the standard library until a command runs, so --help answers at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

DTYPES = ("auto", "float32", "float16", "bfloat16")


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when set, else half the cores this process may use (at least 1).

    PyTorch's CPU threads wait on each other at every operation, so with more threads than free
    cores one descheduled thread stalls the rest. Measured by ``benchmarks/threads.py`` on a 2-core
    machine that other jobs shared (organism, median item): explain 0.11 s on 1 thread vs 2.0 s on
    2; with one more process spinning, 0.23 s vs 2.4 s; a compare item 27 s vs 379 s. Half the
    cores leaves room for whatever else runs.
    """
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value} (leave the option out "
                                         "to use its default)")
    return value


def _settings(args):
    """Apply --threads and resolve --device / --dtype into ``(device, torch dtype)``."""
    import torch

    from .sharding import local_device

    torch.set_num_threads(args.threads)
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this torch build sees no CUDA GPU (torch {torch.__version__}); "
                         "install a CUDA build of torch (see the README's Set-up) or use --device cpu")
    device = local_device(device)  # under torchrun / accelerate launch, cuda -> this rank's GPU
    dtype = args.dtype
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    return device, getattr(torch, dtype)


def _device_map(text: str | None):
    """``--device-map``: a strategy name (auto, balanced, ...) as given, or a JSON object / a ``.json`` file of
    module name -> device (``"cpu"``, ``"cuda:1"``, a GPU index, ``"disk"``), as transformers takes it."""
    inline = text is not None and text.lstrip()[:1] in ("{", "[")
    if text is None or not (inline or text.endswith(".json")):
        return text
    from pathlib import Path

    try:
        mapping = json.loads(text if inline else Path(text).read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"--device-map {text!r} is not valid JSON ({err}); give a strategy (auto, balanced, "
                         'sequential) or a JSON object such as \'{"model": "cpu", "lm_head": "cpu"}\'') from None
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(f"--device-map {text!r}: a JSON device map is an object of module name -> device, got "
                         f"{type(mapping).__name__} {mapping!r}")
    return mapping


def _load(args):
    from .model import VQAModel

    device, dtype = _settings(args)
    backend = getattr(args, "backend", "hooks")
    remote = {None: False, "local": "local", "ndif": True}[getattr(args, "remote", None)]
    if remote and backend != "nnsight":
        raise ValueError(f"--remote {args.remote} runs the model through nnsight: add --backend nnsight")
    options = dict(dtype=dtype, backend=backend, remote=remote)
    device_map = _device_map(getattr(args, "device_map", None))
    if device_map is not None:
        options["device_map"] = device_map     # accelerate places the layers; no single --device
        if getattr(args, "offload_folder", None):   # safetensors checkpoints offload to disk without one
            options["offload_folder"] = args.offload_folder
    elif remote is not True:                   # an NDIF client holds no weights to move
        options["device"] = device
    if args.model in (None, "organism"):
        return VQAModel.organism(**options)
    return VQAModel.from_pretrained(args.model, **options)


def _demo(args) -> int:
    from .demo import run_demo
    from .results.base import dumps_strict

    scores = run_demo(_load(args), out_dir=args.out, image=args.image, question=args.question,
                      methods=args.methods.split(",") if args.methods else None, view=args.view)
    print(dumps_strict({k: v for k, v in scores.items() if k != "methods"}, indent=1))
    for name, entry in scores["methods"].items():
        print(f"{name:>22}: {entry.get('png', entry.get('error'))}")
    return 0


def _run(args) -> int:
    from .dataset import check_resumable, read_dataset, run_dataset
    from .sharding import resolve_shard

    read_dataset(args.dataset)  # a missing or empty dataset fails before the model loads
    shard = resolve_shard(args.shard)
    if args.view and args.task not in ("explain", "compare"):
        print(f"mech-vqa: --view applies to the explain and compare tasks, not {args.task}", file=sys.stderr)
        return 2
    extra = {"view": args.view} if args.view else {}
    check_resumable(args.out, args.task, extra, shard)  # so does a results file of another task or options
    counts = run_dataset(_load(args), args.dataset, args.out, args.task, limit=args.limit,
                         progress=not args.no_progress, shard=shard, **extra)
    print(json.dumps(counts))
    return 0


def _merge(args) -> int:
    from .sharding import merge_shards

    report = merge_shards(args.shards, args.out)
    print(json.dumps(report))
    if not report["complete"] or report["conflicting"]:
        print(f"mech-vqa merge: incomplete: {len(report['missing_shards'])} shard(s) and "
              f"{len(report['missing_items'])} item(s) missing, {len(report['conflicting'])} conflicting; rerun the "
              "missing ranks (they resume) and merge again", file=sys.stderr)
        return 1
    return 0


def _summary(args) -> int:
    from pathlib import Path

    from .summary import summarize

    tables = None
    if not args.no_tables:
        results = Path(args.results)
        tables = args.tables or str(results.with_name(results.stem + "_tables"))
    print(summarize(args.results, figures=args.figures, tables_dir=tables))
    return 0


def _eval(args) -> int:
    from .organism.evaluate import main as evaluate_main

    argv = ["--n", str(args.n), "--methods", args.methods, "--threads", str(args.threads), "--organism", args.organism]
    argv += ["--model", args.model] if args.model else []
    return evaluate_main(argv) or 0


def _explore(args) -> int:
    from .explorer.app import serve

    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"mech-vqa explore: serving on {args.host} makes the app (and the model) reachable from other "
              "machines; it has no authentication", file=sys.stderr)
    serve(_load(args), host=args.host, port=args.port, open_browser=args.open, verbose=args.verbose)
    return 0


def _model_options(parser, model_help: str, device: bool = True) -> None:
    parser.add_argument("--model", default=None, help=model_help)
    if device:
        parser.add_argument("--device", default="auto",
                            help="cpu, cuda, cuda:1, ... (default auto: cuda when torch sees a GPU, else cpu)")
        parser.add_argument("--dtype", default="auto", choices=DTYPES,
                            help="weights' dtype (default auto: float16 on a GPU, float32 on the CPU; a 7B model "
                                 "needs ~14 GB in float16); scores are computed in float32 either way")
        parser.add_argument("--backend", default="hooks", choices=("hooks", "nnsight"),
                            help="engine for captures and interventions (default hooks, the fastest in-process; "
                                 "nnsight: the same results through nnsight 0.8, relevancy and iGOS included, with "
                                 "their gradients taken inside the trace; the backend for --remote)")
        parser.add_argument("--remote", default=None, choices=("local", "ndif"),
                            help="with --backend nnsight: 'ndif' runs every trace on NDIF (API key from "
                                 "NDIF_API_KEY or nnsight's config; the model must be hosted there; no weights "
                                 "are loaded here), 'local' runs nnsight's offline simulation of that call")
        parser.add_argument("--device-map", default=None,
                            help="accelerate device map for from_pretrained (e.g. auto, balanced, sequential, or "
                                 "a JSON object / .json file of module name -> device, 'disk' included): layers "
                                 "spread over the GPUs, CPU memory and disk; replaces --device")
        parser.add_argument("--offload-folder", default=None,
                            help="with --device-map: folder for the weights of modules offloaded to disk (a "
                                 "safetensors checkpoint needs none: they are read from its files)")
    parser.add_argument("--threads", type=_positive_int, default=default_threads(),
                        help=f"CPU threads for torch (default {default_threads()}: OMP_NUM_THREADS when set, else "
                             "half the usable cores). More threads than free cores make torch's threads wait "
                             "on each other: on a shared 2-core machine an explain item took 0.23 s on 1 thread "
                             "and 2.4 s on 2, a compare item 27 s and 379 s (benchmarks/threads.py)")


def build_parser() -> argparse.ArgumentParser:
    from .tasks import COMMON_COLUMNS, TASK_HELP  # plain strings: no torch imported

    parser = argparse.ArgumentParser(prog="mech-vqa", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = "hub id or local folder of a LLaVA model (default: the organism shipped in data/)"
    from .methods import PATCH_METHODS

    names = ", ".join(PATCH_METHODS)  # igos+ (one mask) and igos++ (two masks) are separate methods

    demo = sub.add_parser("demo", help="answer a question about a shipped image and write heatmaps + scores",
                          description="Answer a question about an image, then explain the answer with every "
                                      "patch-importance method: one heatmap per method, side-by-side and "
                                      "layer / head figures, and scores.json (strict JSON).")
    demo.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    _model_options(demo, model_help)
    demo.add_argument("--image", default=None, help="an image file (default: the first evaluation item)")
    demo.add_argument("--question", default=None, help="the question (default: the item's)")
    demo.add_argument("--methods", default=None, help=f"comma-separated patch methods (default: all): {names}")
    demo.add_argument("--view", type=int, default=0,
                      help="1: draw a tiled model's high-resolution tokens (LLaVA-NeXT / OneVision); default 0")
    demo.set_defaults(func=_demo)

    import textwrap

    tasks = "\n".join(textwrap.fill(text, 100, initial_indent=f"  {name:<9}", subsequent_indent=" " * 11)
                      for name, text in sorted(TASK_HELP.items()))
    common = textwrap.fill(f"columns of {COMMON_COLUMNS}", 100)
    run = sub.add_parser(
        "run", help="run a task over a JSONL dataset, appending one row per item (resumable)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run TASK on every row of DATASET.jsonl; each finished item appends one strict-JSON row to "
                    "--out (NaN written as null). The file's first line records the task, options and model; "
                    "rerunning the same command resumes, and resuming with other settings is an error.",
        epilog=f"tasks:\n{tasks}\n\n{common}")
    run.add_argument("task", choices=sorted(TASK_HELP), help="what to compute per item (see below)")
    run.add_argument("dataset", help='JSONL rows {"image", "question", "answer"?, "answer_word"?, "box"?}')
    run.add_argument("--out", required=True, help="results JSONL file (appended; rerun to resume)")
    _model_options(run, model_help)
    run.add_argument("--limit", type=_positive_int, default=None, help="only the first N rows (N >= 1)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    run.add_argument("--view", type=int, default=0,
                     help="explain/compare: which image view the maps show (0 = the whole image's grid; 1 = a "
                          "tiled model's high-resolution tokens, LLaVA-NeXT / OneVision)")
    run.add_argument("--shard", default=None, metavar="I/N",
                     help="run only shard I of N (0-based; items whose index mod N is I) into <out>.shard-I-of-N"
                          ".jsonl; default: from torchrun / accelerate launch (RANK, WORLD_SIZE) or a Slurm job "
                          "array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT), else unsharded. Join the shards "
                          "with `mech-vqa merge`")
    run.set_defaults(func=_run)

    merge = sub.add_parser("merge", help="join the shard files of a sharded run into one results file",
                           description="Join the results files of the ranks of one sharded `mech-vqa run` into "
                                       "one results file, rows in dataset order. Shards of another task, options, "
                                       "model or dataset are refused; missing shards or items and duplicates "
                                       "are reported (exit status 1 when incomplete).")
    merge.add_argument("shards", nargs="+",
                       help="shard files, their folder, or a glob such as 'out/r.shard-*-of-*.jsonl'")
    merge.add_argument("--out", required=True, help="the merged results JSONL (written whole, atomically)")
    merge.set_defaults(func=_merge)

    summary = sub.add_parser("summary", help="print the dataset table of a results file, save tables and figures",
                             description="Aggregate a results file written by `mech-vqa run`: print the tables, "
                                         "write each as CSV (and parquet when pyarrow is installed: the "
                                         "'tables' extra) plus summary.json, and with --figures the figures "
                                         "that apply to the task.")
    summary.add_argument("results", help="a results JSONL written by `mech-vqa run`")
    summary.add_argument("--figures", default=None, help="folder for the figures (made only if one applies)")
    summary.add_argument("--tables", default=None,
                         help="folder for the CSV / parquet tables and summary.json (default: <results>_tables "
                              "beside the results file)")
    summary.add_argument("--no-tables", action="store_true", help="print only; write no tables")
    summary.set_defaults(func=_summary)

    evaluate = sub.add_parser("eval", help="organism accuracy and localisation of every patch method",
                              description="Score the organism on fresh synthetic questions: answer accuracy, "
                                          "and how often each patch method's map points into the asked object.")
    evaluate.add_argument("--n", type=_positive_int, default=100,
                          help="number of fresh synthetic questions to score (default 100)")
    _model_options(evaluate, "a saved organism folder (default: data/organism); runs on the CPU in float32",
                   device=False)
    evaluate.add_argument("--organism", default="scaffolded", choices=["scaffolded", "free"],
                          help="shipped organism to score when no --model (default scaffolded: trained with an "
                               "attention scaffold on layer 2, head 0; free: trained without it)")
    evaluate.add_argument("--methods", default="all", help=f"comma-separated patch methods (default: all): {names}")
    evaluate.set_defaults(func=_eval)

    explore = sub.add_parser("explore", help="a local web app: ask about an image, click answer tokens and heads",
                             description="Serve the explorer on this machine: pick one of the organism's evaluation "
                                         "images or upload one, ask, see the greedy answer; click an answer token "
                                         "to compute its maps, a head for its position-level map; switch "
                                         "methods; knock out heads or blocks and see the answer change; export "
                                         "the view as a static HTML file or the results as files. Nothing is "
                                         "fetched from or sent to the network.")
    _model_options(explore, model_help)
    explore.add_argument("--port", type=int, default=7860, help="port on --host (default 7860; 0: any free port)")
    explore.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this "
                                                             "machine only)")
    explore.add_argument("--open", action="store_true", help="open the page in the default browser")
    explore.add_argument("--verbose", action="store_true", help="log every request")
    explore.set_defaults(func=_explore)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    # DatasetError, ModelLoadError, bad inputs, a method the chosen --backend cannot run (BackendNotSupported,
    # a NotImplementedError): one line, no traceback
    except (OSError, ValueError, NotImplementedError) as err:
        print(f"mech-vqa: error: {err}", file=sys.stderr)
        return 2
    except Exception as err:
        if type(err).__name__ != "RemoteError":   # nnsight's: the remote job failed on the server
            raise
        print(f"mech-vqa: error: the remote job failed ({err}); rows written so far are kept, run the same "
              "command again to resume", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
