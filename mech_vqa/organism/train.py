"""Train the organism from scratch on CPU.

``python -m mech_vqa.organism.train --out DIR --steps N [...]``

Why it is reproducible and resumable: the batch of step ``s`` is drawn from
``numpy.random.default_rng([seed, s])``, so no data-stream state needs saving; every
``--ckpt-every`` steps ``DIR/checkpoint.pt`` stores model, optimizer, scheduler, torch RNG
state, step, elapsed time and the log (tensors and plain containers only, loaded with
``weights_only=True``). Re-running the same command resumes from it and ends with exactly the
parameters of an uninterrupted run. At the end the model and processor are written to ``DIR``
with ``save_pretrained`` together with ``training_log.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mech_vqa.organism.model import DEFAULT_SIZES, answer_loss, build_organism, encode
from mech_vqa.organism.synthetic import FAMILIES, generate_item, generate_items

HELDOUT_SEED = 777  # the in-training validation set; evaluate.py uses other seeds


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (checkpoint + final model)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine decays to lr * this")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--curriculum", type=int, default=0,
                   help="steps over which the max objects per image grows from 1 to 4 (0: always 1-4)")
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-n", type=int, default=200, help="held-out items (2-4 objects) per evaluation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (after checkpointing) at this step without finishing; for tests")
    for name, value in DEFAULT_SIZES.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    return p.parse_args(argv)


def max_objects_at(step: int, curriculum: int) -> int:
    """Objects per image: 1..max, with max growing linearly from 1 to 4 over ``curriculum`` steps."""
    if curriculum <= 0:
        return 4
    return min(4, 1 + (3 * step) // curriculum)


def training_batch(step: int, args) -> list:
    """The batch of ``step``: a pure function of (seed, step), hence exact resumption."""
    rng = np.random.default_rng([args.seed, step])
    top = max_objects_at(step, args.curriculum)
    return [generate_item(rng, image_size=args.image_size, min_objects=1, max_objects=top) for _ in range(args.batch)]


def lr_lambda(args):
    def f(step: int) -> float:
        if step < args.warmup:
            return (step + 1) / args.warmup
        t = (step - args.warmup) / max(1, args.steps - args.warmup)
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))
    return f


@torch.no_grad()
def heldout_accuracy(model, batches) -> dict:
    """Answer-word accuracy on pre-encoded held-out batches, overall and per n_objects/family."""
    model.eval()
    hits = {}
    for batch, items in batches:
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "answer_index")}
        _, correct = answer_loss(model(**inputs).logits, batch)
        for ok, it in zip(correct.tolist(), items):
            for key in ("all", f"n{it.n_objects}", it.family):
                hits.setdefault(key, []).append(ok)
    model.train()
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = {k: getattr(args, k) for k in DEFAULT_SIZES}
    model, processor = build_organism(seed=args.seed, **sizes)
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args))
    step, elapsed, log = 0, 0.0, []
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step, elapsed, log = int(state["step"]), float(state["elapsed_s"]), list(state["log"])
        print(f"resumed from {ckpt_path} at step {step}")

    heldout = generate_items(args.eval_n, seed=HELDOUT_SEED, min_objects=2, max_objects=4,
                             families=FAMILIES, image_size=args.image_size)
    heldout = [(encode(processor, heldout[i : i + 100]), heldout[i : i + 100]) for i in range(0, len(heldout), 100)]

    def save_checkpoint():
        torch.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
            "step": step, "elapsed_s": elapsed, "log": log, "args": vars(args),
        }, ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)  # atomic: a kill never leaves half a file

    stop = min(args.steps, args.stop_after or args.steps)
    bar = tqdm(total=args.steps, initial=step, desc="organism", dynamic_ncols=True)
    window = []
    while step < stop:
        t0 = time.perf_counter()
        batch = encode(processor, training_batch(step, args))
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "answer_index")}
        loss, correct = answer_loss(model(**inputs).logits, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        elapsed += time.perf_counter() - t0
        window.append((loss.item(), correct.float().mean().item()))
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
        if step % args.eval_every == 0 or step == args.steps:
            entry = {"step": step, "elapsed_s": round(elapsed, 1),
                     "train_loss": float(np.mean([w[0] for w in window])),
                     "train_acc": float(np.mean([w[1] for w in window])),
                     "max_objects": max_objects_at(step - 1, args.curriculum),
                     "heldout": heldout_accuracy(model, heldout)}
            window = []
            log.append(entry)
            bar.write(json.dumps(entry))
        if step % args.ckpt_every == 0 or step == stop:
            save_checkpoint()
    bar.close()

    if step >= args.steps:
        model.eval()
        model.save_pretrained(out)
        processor.save_pretrained(out)
        with open(out / "training_log.json", "w") as f:
            json.dump({"args": vars(args), "training_time_s": round(elapsed, 1), "log": log}, f, indent=1)
        print(f"done: {step} steps in {elapsed / 60:.1f} min of training; model in {out}")
    return model, processor


if __name__ == "__main__":
    main()
