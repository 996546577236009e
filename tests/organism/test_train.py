"""The training script runs, checkpoints, and resumes to exactly the uninterrupted result."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mech_vqa.organism import load_organism
from mech_vqa.organism.train import main

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--batch", "4", "--warmup", "2", "--eval-every", "2", "--eval-n", "4", "--ckpt-every", "1",
        "--patch-size", "16", "--vision-hidden", "16", "--vision-heads", "2", "--hidden", "32", "--layers", "1",
        "--heads", "2", "--kv-heads", "1", "--threads", "1",
        "--attn-sup", "1.0", "--attn-sup-layer", "0", "--attn-sup-until", "3"]


def test_train_resume_is_exact(tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    main(["--out", str(full), "--steps", "4", *TINY])
    # Interrupted run through the command line, stopped after step 2 with a checkpoint ...
    subprocess.run([sys.executable, "-m", "mech_vqa.organism.train", "--out", str(split), "--steps", "4",
                    "--stop-after", "2", *TINY], check=True, cwd=ROOT, capture_output=True)
    state = torch.load(split / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and not (split / "model.safetensors").exists()
    # ... then resumed by the same command to the full step count.
    main(["--out", str(split), "--steps", "4", *TINY])
    a, b = load_file(full / "model.safetensors"), load_file(split / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    log = json.loads((split / "training_log.json").read_text())
    assert [e["step"] for e in log["log"]] == [2, 4] and log["steps"] == 4
    model, processor = load_organism(split)
    assert model.config.text_config.num_key_value_heads == 1


def test_a_higher_target_resumes_a_run_stopped_by_a_lower_one(tmp_path):
    """--target stops a run without changing its state, so rerunning with a higher target continues
    to exactly the weights of an uninterrupted run with that target; the same target stays stopped."""
    one_level = [*TINY, "--max-objects", "1"]
    full, early = tmp_path / "full", tmp_path / "early"
    main(["--out", str(full), "--steps", "4", "--target", "2.0", *one_level])  # never reached: 4 steps
    main(["--out", str(early), "--steps", "4", "--target", "0.0", *one_level])  # reached at the first evaluation
    assert json.loads((early / "training_log.json").read_text())["steps"] == 2
    main(["--out", str(early), "--steps", "4", "--target", "0.0", *one_level])
    assert torch.load(early / "checkpoint.pt", weights_only=True)["step"] == 2
    main(["--out", str(early), "--steps", "4", "--target", "2.0", *one_level])
    a, b = load_file(full / "model.safetensors"), load_file(early / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((early / "training_log.json").read_text())["steps"] == 4


def test_loss_terms_name_the_scaffold_only_in_the_scaffolded_recipe():
    from mech_vqa.organism.train import RECIPES, loss_terms, recipe_args

    def mentions_attention(terms):
        return [t for t in terms if any(word in t.lower() for word in ("attention", "head", "layer"))]

    assert set(RECIPES) == {"scaffolded", "free"}
    free, scaffolded = loss_terms(recipe_args("free")), loss_terms(recipe_args("scaffolded"))
    assert free and not mentions_attention(free)
    assert mentions_attention(scaffolded) == [scaffolded[-1]] and "layer 2, head 0" in scaffolded[-1]
    assert scaffolded[:-1] == free  # the same answer losses, plus the scaffold
    with pytest.raises(ValueError, match="unknown organism recipe 'bogus'"):
        recipe_args("bogus")
