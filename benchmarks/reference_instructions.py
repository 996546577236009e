"""``explain`` against the llava-mechanism notebook's algorithm in executed instructions (issue 12, item 7).

The wall-time comparison (``reference_mechanism.py``) is a few percent on a tiny model, and a shared
machine moves wall times by more than that from run to run. Instructions executed per call do not move
with the machine's load: each path runs in a process of its own under valgrind's callgrind, which counts
only between two switches made by the process itself (``callgrind_control -i on`` / ``off``), after
warm-up and with Python's cyclic garbage collector paused (it runs at moments set by allocation counts,
not by the path). Each path runs twice, ``--calls`` and 3x as many calls: the difference over the extra
calls is the cost of one call, without the fixed cost of the switches.

Instructions are not time (a call into a vectorised kernel does more per cycle than the interpreter), so
this is the stable companion to the wall-time ratio, not a replacement for it.

    python benchmarks/reference_instructions.py [--calls 10]   (needs valgrind; ~4 min on 2 cores)
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PATHS = ("reference (notebook)", "explain(heads='top')")


def child(path: str, calls: int) -> None:
    """Run inside callgrind: set up, warm up, then count ``calls`` calls of ``path``."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from PIL import Image
    from reference_mechanism import ReferenceMechanism, prompt_and_target, tiny_vqa

    from mech_vqa.methods.mechanistic import explain

    torch.set_num_threads(1)
    vqa = tiny_vqa()
    reference = ReferenceMechanism(vqa)
    inp, target = prompt_and_target(vqa, reference, Image.new("RGB", (32, 32), (200, 30, 30)))
    run = {PATHS[0]: lambda: reference(inp, target.token_id),
           PATHS[1]: lambda: explain(vqa, inp, target, progress=False)}[path]
    for _ in range(5):
        run()
    gc.collect()
    gc.disable()
    switch = ["callgrind_control", "-i"]
    subprocess.run([*switch, "on", str(os.getpid())], check=True, capture_output=True)
    for _ in range(calls):
        run()
    subprocess.run([*switch, "off", str(os.getpid())], check=True, capture_output=True)


def counted(path: str, calls: int, folder: Path) -> int:
    """Instructions callgrind counted in a child running ``calls`` calls of ``path``."""
    out = folder / f"callgrind.{PATHS.index(path)}.{calls}.out"
    command = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
               sys.executable, __file__, "--child", path, "--calls", str(calls)]
    done = subprocess.run(command, capture_output=True, text=True, check=False,
                          env={**os.environ, "PYTHONHASHSEED": "0"})
    if done.returncode != 0:
        raise RuntimeError(f"callgrind run of {path!r} failed:\n{done.stderr[-3000:]}")
    totals = re.findall(r"^totals:\s*(\d+)", out.read_text(), re.MULTILINE)  # (the header's summary is 0 here)
    if not totals:
        raise RuntimeError(f"no instruction total in {out}")
    return int(totals[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--child", choices=PATHS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.calls)
        return
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind); this benchmark counts instructions "
                 "with its callgrind tool")
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import header

    torch.set_num_threads(1)  # (what the counted children use)
    header("explain vs the llava-mechanism notebook's algorithm, in instructions per call (callgrind)")
    jobs = [(path, calls) for path in PATHS for calls in (args.calls, 3 * args.calls)]
    with tempfile.TemporaryDirectory() as folder, ThreadPoolExecutor(max_workers=2) as pool:
        totals = dict(zip(jobs, pool.map(lambda job: counted(*job, Path(folder)), jobs)))
    per_call = {path: (totals[path, 3 * args.calls] - totals[path, args.calls]) / (2 * args.calls) for path in PATHS}
    print(f"tiny 3-layer model, 1 thread, {2 * args.calls} calls counted per path (after warm-up, collector paused)")
    for path in PATHS:
        print(f"    {path:24s} {per_call[path] / 1e6:8.3f} M instructions per call")
    print(f"    RESULT tiny instructions: explain/reference={per_call[PATHS[1]] / per_call[PATHS[0]]:.3f}x")


if __name__ == "__main__":
    main()
