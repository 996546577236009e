"""Train the organism from scratch on CPU.

``python -m mech_vqa.organism.train --out DIR --steps N [...]``

Curriculum: images start with one object (the model first learns to read an object's colour and
pattern); the maximum number of objects per image (the *level*) goes up by one whenever the
training accuracy on images with ``level`` objects, over the last ``--window`` steps, reaches
``--advance-at``. Half of each batch has exactly ``level`` objects, the rest 1..level.

Retrieving the named object among several needs two hops: the answer position must fetch the
named attribute from the text, then match it against the image patches. Trained on the real
questions alone, two-object accuracy stayed at chance for 1.5k steps: the answer position
attended only to the image. Two aids, both on by default:

* a share of "copy" questions (``--copy-frac``; the answer repeats the named attribute, "What is
  the color of the red object?") teaches the first hop -- alone, still at chance after 1.5k steps;
* an attention scaffold (``--attn-sup``): -log of the attention mass that text layer
  ``--attn-sup-layer``, head ``--attn-sup-head`` puts from the answer position on the answer
  object's patches. With it two objects are learned in ~500 steps and four by ~1k. That head is
  therefore a planted retrieval head, a known circuit component of the organism.

The control organism ("free" in ``RECIPES``) drops the scaffold: its loss is the answer
cross-entropy alone (``loss_terms`` lists a run's terms). Trained that way the vision tower lost the
fill pattern (a linear probe on its patch features fell from ~0.8 at initialisation to chance within
400 steps while colour was learned), so the free recipe keeps the tower at its random
initialisation (``--vision-lr-scale 0``); the projector and text model are trained.

Why it is reproducible and resumable: the batch of step ``s`` is drawn from
``numpy.random.default_rng([seed, s])`` given the level, so no data-stream state needs saving;
every ``--ckpt-every`` steps ``DIR/checkpoint.pt`` stores model, optimizer, scheduler, torch RNG
state, step, level, the accuracy window, elapsed time and the log (tensors and plain containers
only, loaded with ``weights_only=True``). Re-running the same command resumes from it and ends
with exactly the parameters of an uninterrupted run. At the end the model and processor are
written to ``DIR`` with ``save_pretrained``, together with ``training_log.json``.
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
from mech_vqa.organism.synthetic import ALL_FAMILIES, COPY_FAMILIES, FAMILIES, generate_item, generate_items

HELDOUT_SEED = 777  # the in-training validation set; evaluate.py uses other seeds

# The shipped organisms, each the extra arguments of ``python -m mech_vqa.organism.train --out DIR``
# (``docs/organism.md``). "scaffolded" is the defaults; "free" trains with the answer losses only
# and keeps the vision tower at its random initialisation (see ``--vision-lr-scale``).
RECIPES = {
    "scaffolded": [],
    "free": ["--attn-sup", "0", "--vision-lr-scale", "0", "--eval-every", "100", "--ckpt-every", "100",
             "--steps", "7000", "--target", "0.99"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output directory (checkpoint + final model)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="cosine decays to lr * this")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=ALL_FAMILIES)
    p.add_argument("--copy-frac", type=float, default=0.25,
                   help="share of each batch drawn from the copy warm-up families (answer = named attribute)")
    p.add_argument("--attn-sup", type=float, default=1.0,
                   help="weight of the attention scaffold: one head's attention from the answer position "
                        "is pulled onto the answer object's patches (0: off)")
    p.add_argument("--attn-sup-layer", type=int, default=2)
    p.add_argument("--attn-sup-head", type=int, default=0)
    p.add_argument("--attn-sup-until", type=int, default=None, help="scaffold only before this step")
    p.add_argument("--vision-lr-scale", type=float, default=1.0,
                   help="learning rate of the vision tower relative to --lr; 0 keeps it at its random init. "
                        "Trained by the answer loss alone, the tower's features lose the fill pattern within a "
                        "few hundred steps (a linear probe falls from ~0.8 to chance) while colour is learned")
    p.add_argument("--max-objects", type=int, default=4, help="most objects per training image")
    p.add_argument("--start-level", type=int, default=1, help="curriculum: objects per image at the start")
    p.add_argument("--advance-at", type=float, default=0.9, help="curriculum: accuracy to add an object")
    p.add_argument("--window", type=int, default=100, help="curriculum: steps the accuracy is measured over")
    p.add_argument("--target", type=float, default=None,
                   help="finish early once the held-out accuracy (2-4 objects) reaches this at the top level")
    p.add_argument("--ckpt-every", type=int, default=250)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-n", type=int, default=200, help="held-out items (2-4 objects) per evaluation")
    p.add_argument("--threads", type=int, default=2,
                   help="torch threads; 1 is much faster when another process competes for the 2 cores")
    p.add_argument("--export-to", default=None,
                   help="only write the model of OUT/checkpoint.pt to this directory (save_pretrained) and exit")
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop (after checkpointing) at this step without finishing; for tests")
    for name, value in DEFAULT_SIZES.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    return p.parse_args(argv)


def training_batch(step: int, level: int, args) -> list:
    """The batch of ``step``: a pure function of (seed, step, level), hence exact resumption."""
    rng = np.random.default_rng([args.seed, step])
    items = []
    for i in range(args.batch):
        n = level if i % 2 == 0 else int(rng.integers(1, level + 1))
        families = COPY_FAMILIES if rng.random() < args.copy_frac else args.families
        family = families[int(rng.integers(len(families)))]
        items.append(generate_item(rng, n_objects=n, family=family, image_size=args.image_size))
    return items


def attention_scaffold_loss(attentions, batch, items, args, image_token_id: int) -> torch.Tensor:
    """-log(attention mass on the answer object's patches) of one head at the answer position.

    A training scaffold for the second retrieval hop (match the named attribute against the
    patches): it gives that head's query/key a direct gradient instead of one through the values.
    """
    attn = attentions[args.attn_sup_layer][:, args.attn_sup_head]  # (batch, query, key)
    rows = torch.arange(len(items))
    attn = attn[rows, batch["answer_index"] - 1]  # the position that predicts the answer word
    grid = args.image_size // args.patch_size
    cells = torch.stack([torch.from_numpy(it.mask.reshape(grid, args.patch_size, grid, args.patch_size)
                                          .any(axis=(1, 3)).reshape(-1)) for it in items])
    on_image = attn[batch["input_ids"] == image_token_id].reshape(len(items), -1)  # row-major patches
    on_target = (on_image * cells).sum(-1)
    return -torch.log(on_target + 1e-6).mean()


def loss_terms(args) -> list[str]:
    """The terms of the training loss a run with ``args`` optimises, each named by what it supervises.

    This is what ``main`` adds up (and what ``training_log.json`` records), so a recipe's terms can
    be read off without training: the "free" recipe's list names no head, layer or attention pattern.
    """
    terms = ["cross-entropy of the answer word", "mean cross-entropy of the other answer tokens"]
    if args.attn_sup > 0:
        until = "all steps" if args.attn_sup_until is None else f"steps < {args.attn_sup_until}"
        terms.append(f"attention scaffold (weight {args.attn_sup:g}, {until}): -log attention mass of text layer "
                     f"{args.attn_sup_layer}, head {args.attn_sup_head} from the answer position on the answer "
                     "object's patches")
    return terms


def recipe_args(name: str, out: str = "OUT") -> argparse.Namespace:
    """The parsed arguments of recipe ``name`` of :data:`RECIPES` (for reading its loss terms)."""
    if name not in RECIPES:
        raise ValueError(f"unknown organism recipe {name!r}; choose one of {sorted(RECIPES)}")
    return parse_args(["--out", out, *RECIPES[name]])


def parameter_groups(model, args) -> list[dict]:
    """AdamW groups: weight decay on matrices (not embeddings); the vision tower at ``--vision-lr-scale``.

    With the default scale of 1 the groups are exactly the two of the original recipe, so its runs
    reproduce; with scale 0 the tower is frozen (no gradient is computed for it at all).
    """
    def decays(name, param):
        return param.ndim >= 2 and "embed" not in name

    named = list(model.named_parameters())
    if args.vision_lr_scale == 1.0:
        return [{"params": [p for n, p in named if decays(n, p)], "weight_decay": args.weight_decay},
                {"params": [p for n, p in named if not decays(n, p)], "weight_decay": 0.0}]
    from mech_vqa.adapters import get_adapter

    tower = get_adapter(model).vision_tower
    vision = {id(p) for p in tower.parameters()}
    if args.vision_lr_scale == 0.0:
        for p in tower.parameters():
            p.requires_grad_(False)
    groups = []
    for in_vision, scale in ((False, 1.0), (True, args.vision_lr_scale)):
        if scale == 0.0:
            continue
        chosen = [(n, p) for n, p in named if (id(p) in vision) == in_vision]
        groups += [{"params": [p for n, p in chosen if decays(n, p)], "weight_decay": args.weight_decay, "lr": args.lr * scale},
                   {"params": [p for n, p in chosen if not decays(n, p)], "weight_decay": 0.0, "lr": args.lr * scale}]
    return groups


def lr_lambda(args):
    """Linear warm-up, then cosine decay to ``min_lr_ratio`` at ``--steps``."""
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
    if args.attn_sup > 0:
        model.set_attn_implementation("eager")  # sdpa returns no attention weights
    model.train()
    optimizer = torch.optim.AdamW(parameter_groups(model, args), lr=args.lr, betas=(0.9, 0.98))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args))
    step, level, elapsed, log, recent, done = 0, args.start_level, 0.0, [], [], False
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists():
        state = torch.load(ckpt_path, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        step, level, elapsed = int(state["step"]), int(state["level"]), float(state["elapsed_s"])
        log, recent = list(state["log"]), list(state["recent"])
        # "done" is re-judged under this run's --target: a run stopped early by a lower target
        # continues exactly as an uninterrupted run with the higher one would (the stop changes no state)
        done = bool(state["done"]) and bool(log) and reached_target(log[-1], args)
        print(f"resumed from {ckpt_path} at step {step}")

    heldout = generate_items(args.eval_n, seed=HELDOUT_SEED, min_objects=2, max_objects=4,
                             families=tuple(args.families), image_size=args.image_size)
    heldout = [(encode(processor, heldout[i : i + 100]), heldout[i : i + 100]) for i in range(0, len(heldout), 100)]

    def save_checkpoint():
        torch.save({
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(),
            "step": step, "level": level, "elapsed_s": elapsed, "log": log, "recent": recent, "done": done,
            "args": vars(args),
        }, ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)  # atomic: a kill never leaves half a file

    if args.export_to:  # ship an unfinished run's latest checkpoint
        write_final(model, processor, Path(args.export_to), args, step, elapsed, log)
        return model, processor
    stop = min(args.steps, args.stop_after or args.steps)
    bar = tqdm(total=args.steps, initial=step, desc="organism", dynamic_ncols=True)
    losses, family_hits = [], {}
    while step < stop and not done:
        t0 = time.perf_counter()
        items = training_batch(step, level, args)
        batch = encode(processor, items)
        inputs = {k: v for k, v in batch.items() if k not in ("labels", "answer_index")}
        scaffold = args.attn_sup > 0 and (args.attn_sup_until is None or step < args.attn_sup_until)
        output = model(**inputs, output_attentions=scaffold)
        loss, correct = answer_loss(output.logits, batch)
        if scaffold:
            loss = loss + args.attn_sup * attention_scaffold_loss(output.attentions, batch, items, args,
                                                                model.config.image_token_id)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        step += 1
        elapsed += time.perf_counter() - t0

        losses.append(loss.item())
        top = [ok for ok, it in zip(correct.tolist(), items) if it.n_objects == level and it.family in FAMILIES]
        if top:
            recent = (recent + [float(np.mean(top))])[-args.window :]
        for ok, it in zip(correct.tolist(), items):
            family_hits.setdefault(f"{it.family}/n{it.n_objects}", []).append(ok)
        if level < args.max_objects and len(recent) == args.window and np.mean(recent) >= args.advance_at:
            bar.write(f"step {step}: accuracy {np.mean(recent):.3f} on {level} objects -> level {level + 1}")
            level, recent = level + 1, []
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", level=level, lr=f"{scheduler.get_last_lr()[0]:.1e}")

        if step % args.eval_every == 0 or step == args.steps:
            entry = {"step": step, "elapsed_s": round(elapsed, 1), "level": level,
                     "train_loss": float(np.mean(losses)),
                     "train_acc": {k: float(np.mean(v)) for k, v in sorted(family_hits.items())},
                     "heldout": heldout_accuracy(model, heldout)}
            losses, family_hits = [], {}
            log.append(entry)
            bar.write(json.dumps(entry))
            done = reached_target(entry, args)
        if step % args.ckpt_every == 0 or step == stop or done:
            save_checkpoint()
    bar.close()

    if step >= args.steps or done:
        write_final(model, processor, out, args, step, elapsed, log)
    return model, processor


def reached_target(entry: dict, args) -> bool:
    """Whether a log entry ends the run: the held-out accuracy reached ``--target`` at the top level."""
    return args.target is not None and entry["level"] == args.max_objects and entry["heldout"]["all"] >= args.target


def write_final(model, processor, out: Path, args, step: int, elapsed: float, log: list):
    """save_pretrained model + processor (safetensors) and ``training_log.json`` into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model.eval()
    model.set_attn_implementation("sdpa")  # ship the default, not the scaffold's eager attention
    model.save_pretrained(out)
    processor.save_pretrained(out)
    with open(out / "training_log.json", "w") as f:
        json.dump({"args": vars(args), "loss_terms": loss_terms(args), "steps": step, "training_time_s": round(elapsed, 1), "log": log}, f, indent=1)
    print(f"{step} steps in {elapsed / 60:.1f} min of training; model in {out}")


if __name__ == "__main__":
    main()
