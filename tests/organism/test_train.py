"""The training script runs, checkpoints, and resumes to exactly the uninterrupted result."""

import json
import subprocess
import sys
from pathlib import Path

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
