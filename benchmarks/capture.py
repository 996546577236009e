"""Cost of capture: a plain forward against a forward recording what the mechanistic methods need.

Target (issue 2): capture at the target position <= 1.1x a plain forward on the mid-size model.
"capture@t" is the trace ``explain`` runs its forward in (:func:`~mech_vqa.methods.mechanistic.target_trace`:
everything at t, keys and values of every layer everywhere), set up and removed on every call.
Also prints the cost of capturing the same names at every position, for reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, interleaved_medians, midsize_input, midsize_vqa  # noqa: E402

from mech_vqa.methods.mechanistic import target_trace  # noqa: E402

MECHANISTIC = ["resid_pre", "attn_out", "mlp_out", "z", "q", "k", "v", "mlp_act"]


def main() -> None:
    header("capture overhead")
    vqa = midsize_vqa()
    inp = midsize_input(vqa)
    t = inp.target().position
    last = vqa.adapter.n_layers - 1
    print(f"model: {vqa}\nsequence length: {inp.seq_len}, target position {t}")

    @torch.no_grad()
    def plain():
        vqa.forward(inp)

    @torch.no_grad()
    def captured():
        with target_trace(vqa, torch.tensor([t]), list(range(last + 1))):
            vqa.forward(inp)

    @torch.no_grad()
    def captured_all_positions():
        with vqa.trace(MECHANISTIC + ["resid_post"]):
            vqa.forward(inp)

    times = interleaved_medians({"plain": plain, "capture@t": captured, "capture@all": captured_all_positions},
                                repeats=11)
    for name, value in times.items():
        print(f"{name:>12}: {value * 1e3:8.1f} ms   ratio {value / times['plain']:.3f}x")
    ratio = times["capture@t"] / times["plain"]
    print(f"RESULT capture_overhead_ratio={ratio:.3f} (target <= 1.1)")


if __name__ == "__main__":
    main()
