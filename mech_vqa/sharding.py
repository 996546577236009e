"""Sharded dataset runs: many processes, GPUs or nodes, one study.

A dataset of ``N`` items is split into ``n`` shards by item index, ``shard i = {k : k mod n = i}``:
deterministic (the same ``n`` always gives the same split), interleaved (slow items spread over
the ranks), and disjoint (no two ranks ever process the same item). Each rank runs
:func:`~mech_vqa.dataset.run_dataset` on its own items into its own results file, next to the
requested one (``R.jsonl`` -> ``R.shard-1-of-4.jsonl``), whose header records the shard, the task,
options and model, and the dataset's fingerprint; so each rank resumes on its own after a crash, as
a single run does.

The rank comes from ``--shard i/n`` (Slurm job arrays, hand-launched jobs), else from the launcher's
environment: ``RANK`` / ``WORLD_SIZE`` (``torchrun``, ``accelerate launch``), else
``SLURM_ARRAY_TASK_ID`` with ``SLURM_ARRAY_TASK_COUNT`` (a 0-based array ``--array=0-(n-1)``). Ranks
never talk to each other, so a rank killed and relaunched alone catches up without the others.

:func:`merge_shards` joins the shard files into one results file (rows in dataset order), refusing
shards made with other settings and reporting missing shards, missing items and duplicates.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import json
import os
import re
from pathlib import Path

SHARD_SUFFIX = re.compile(r"\.shard-(\d+)-of-(\d+)$")
MERGE_COMPARED = ("task", "options", "model", "dataset_sha256", "n_items")
"""Header fields every shard of one study must share."""


class ShardError(ValueError):
    """Shards that cannot be used together, or a shard specification that makes no sense."""


@dataclasses.dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based)."""

    index: int = 0
    count: int = 1

    def __post_init__(self):
        if not (isinstance(self.count, int) and self.count >= 1):
            raise ShardError(f"the number of shards must be a whole number >= 1, got {self.count!r}")
        if not (isinstance(self.index, int) and 0 <= self.index < self.count):
            raise ShardError(f"shard index {self.index!r} is outside 0..{self.count - 1} "
                             f"(shards are numbered from 0: --shard 0/{self.count} .. {self.count - 1}/{self.count})")

    @property
    def sharded(self) -> bool:
        return self.count > 1

    def owns(self, index: int) -> bool:
        return index % self.count == self.index

    def select(self, rows: list[dict]) -> list[dict]:
        """The rows of this shard (by their ``_index`` in the dataset)."""
        return [row for row in rows if self.owns(int(row["_index"]))]

    def path(self, results_path) -> Path:
        """This shard's own results file beside ``results_path`` (the path itself when unsharded)."""
        path = Path(results_path)
        if not self.sharded:
            return path
        return path.with_name(f"{path.stem}.shard-{self.index}-of-{self.count}{path.suffix}")

    def to_dict(self) -> dict:
        return {"index": self.index, "count": self.count}

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(text: str) -> Shard:
    """``"i/n"`` -> :class:`Shard` (one clear error otherwise)."""
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not match:
        raise ShardError(f"--shard expects i/n with 0 <= i < n (e.g. 0/4), got {text!r}")
    return Shard(int(match.group(1)), int(match.group(2)))


def _env_int(env, name: str) -> int | None:
    value = env.get(name)
    if value is None or value == "":
        return None
    if not value.strip().isdigit():
        raise ShardError(f"environment variable {name}={value!r} is not a whole number")
    return int(value)


def shard_from_env(env=None) -> Shard:
    """The shard a launcher assigned through the environment (unsharded when none did)."""
    env = os.environ if env is None else env
    rank, world = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
    if world is not None and world > 1:
        if rank is None:
            raise ShardError("WORLD_SIZE is set but RANK is not; launch with torchrun / accelerate launch, "
                             "or give --shard i/n")
        return Shard(rank, world)
    task, count = _env_int(env, "SLURM_ARRAY_TASK_ID"), _env_int(env, "SLURM_ARRAY_TASK_COUNT")
    if task is not None and count is not None and count > 1:
        low = _env_int(env, "SLURM_ARRAY_TASK_MIN") or 0
        return Shard(task - low, count)
    return Shard()


def resolve_shard(spec: str | None = None, env=None) -> Shard:
    """``--shard i/n`` when given, else the launcher's environment (:func:`shard_from_env`)."""
    return parse_shard(spec) if spec else shard_from_env(env)


def local_device(device: str, env=None) -> str:
    """``cuda`` -> ``cuda:<LOCAL_RANK>`` under a launcher, so each rank of a node takes its own GPU."""
    env = os.environ if env is None else env
    local = _env_int(env, "LOCAL_RANK")
    if device == "cuda" and local is not None:
        return f"cuda:{local}"
    return device


def dataset_fingerprint(path) -> str:
    """SHA-256 of the dataset file's bytes: shards of one study must have read the same rows."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------- merging
def shard_files(sources) -> list[Path]:
    """Shard results files from paths, folders (every ``*.shard-*-of-*.jsonl`` in them) or globs."""
    sources = [sources] if isinstance(sources, (str, Path)) else list(sources)
    found: list[Path] = []
    for source in sources:
        path = Path(source)
        if path.is_dir():
            found += sorted(path.glob("*.shard-*-of-*.jsonl"))
        elif path.is_file():
            found.append(path)
        else:
            matches = sorted(Path(m) for m in glob.glob(str(source)))
            if not matches:
                raise ShardError(f"no shard file matches {source!r}; give the shard files, their folder or a glob "
                                 "such as 'results.shard-*-of-*.jsonl'")
            found += [m for m in matches if m.is_file()]
    unique = list(dict.fromkeys(p.resolve() for p in found))
    if not unique:
        raise ShardError(f"no shard files found in {[str(s) for s in sources]}")
    return unique


def _comparable(row: dict) -> dict:
    """A row without what differs between two runs of the same computation (its time)."""
    return {k: v for k, v in row.items() if k != "runtime_s"}


def _shard_key(header: dict) -> tuple[int, int]:
    shard = header.get("shard") or {"index": 0, "count": 1}
    return int(shard["index"]), int(shard["count"])


def merge_shards(sources, out) -> dict:
    """Join shard results files into one results file ``out``; returns a report.

    Refuses (:class:`ShardError`) shards whose headers differ in task, options, model, dataset or
    item count, shards of different ``n``, two files claiming the same shard, and files without a
    header. The merged file has one header (the shard's, with ``shard`` replaced by
    ``merged_from``) and every row once, in dataset order. The report lists missing shards,
    missing item indices, and items present more than once (kept once; ``conflicting`` when the
    copies differ beyond their runtime). ``report["complete"]`` is True when nothing is missing.
    """
    from .dataset import HEADER_KEY, read_results_file
    from .results.base import dumps_strict

    files = shard_files(sources)
    out = Path(out).resolve()
    files = [f for f in files if f != out]
    headers, rows_of = {}, {}
    for path in files:
        header, rows = read_results_file(path)
        if header is None:
            raise ShardError(f"{path} has no results header; it was not written by `mech-vqa run`")
        headers[path], rows_of[path] = header, rows
    first_path = files[0]
    first = headers[first_path]
    for path in files[1:]:
        differ = [k for k in MERGE_COMPARED if headers[path].get(k) != first.get(k)]
        if differ:
            detail = "; ".join(f"{k}: {json.dumps(first.get(k))} in {first_path.name} vs "
                               f"{json.dumps(headers[path].get(k))} in {path.name}" for k in differ)
            raise ShardError(f"shards made with other settings cannot be merged ({detail}); merge only the shards "
                             "of one `mech-vqa run` command")
    keys = {path: _shard_key(headers[path]) for path in files}
    counts = {count for _, count in keys.values()}
    if len(counts) > 1:
        raise ShardError(f"the files were split into different numbers of shards {sorted(counts)}; merge the "
                         "files of one launch (the same n in --shard i/n or WORLD_SIZE)")
    shards = {}
    for path, key in keys.items():
        if key in shards:
            raise ShardError(f"{shards[key].name} and {path.name} both hold shard {key[0]}/{key[1]}")
        shards[key] = path
    count = next(iter(shards))[1]
    n_items = int(first.get("n_items", 0))
    merged: dict[int, dict] = {}
    duplicates, conflicting = [], []
    for (index, _), path in sorted(shards.items()):
        for row in rows_of[path]:
            item = int(row["index"])
            if item in merged:
                duplicates.append(item)
                if _comparable(merged[item]) != _comparable(row):
                    conflicting.append(item)
                continue
            merged[item] = row
    present = set(merged)
    missing_shards = [i for i in range(count) if (i, count) not in shards]
    missing = [k for k in range(n_items) if k not in present]
    header = {k: v for k, v in first.items() if k != "shard"}
    header[HEADER_KEY] = first[HEADER_KEY]
    header["merged_from"] = [{"file": shards[key].name, **dict(zip(("index", "count"), key))}
                             for key in sorted(shards)]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(dumps_strict(header) + "\n")
        for item in sorted(merged):
            handle.write(dumps_strict(merged[item]) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, out)  # a crash mid-merge leaves no half-written results file
    return {"out": str(out), "shards": len(shards), "of": count, "items": len(merged), "expected": n_items,
            "missing_shards": missing_shards, "missing_items": missing, "duplicates": sorted(set(duplicates)),
            "conflicting": sorted(set(conflicting)), "complete": not missing and not missing_shards}


__all__ = ["Shard", "ShardError", "dataset_fingerprint", "local_device", "merge_shards", "parse_shard",
           "resolve_shard", "shard_files", "shard_from_env"]
