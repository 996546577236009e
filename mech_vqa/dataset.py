"""Dataset runs: one task per item of a JSONL file, results appended as they are computed.

Input rows: ``{"image": path (relative to the JSONL file), "question": str, "answer": str?,
"answer_word": str?, "box": [x0, y0, x1, y1]? (original pixels), "id": str?}``.

Every finished item appends exactly one JSON line to the results file (flushed and fsynced), so a
run killed at any moment resumes where it stopped: on start the results file is read, a torn last
line is cut off, and items already present are skipped — no row lost, none duplicated. A bad row
(missing or unreadable image, no question, a box outside the image) becomes an ``error`` row and
the run goes on.

The first line of a results file is its header, ``{"mech_vqa_results": 1, "task": ..., "options":
{...}, "model": {"name": ..., "dtype": ...}, ...}``: what made the rows. Resuming into a file
whose header names another task, other options or another model is one clear error, never a file
of mixed rows. Rows are strict JSON: NaN and infinities are written as null, and each such field is
listed under the row's ``non_finite`` (see :func:`mech_vqa.results.base.strict_json`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from .results.base import dumps_strict, strict_json

HEADER_KEY = "mech_vqa_results"
"""The key that marks a results file's header line (its value is the format version)."""
FORMAT_VERSION = 1
COMPARED = ("task", "options", "model", "shard")
"""The header fields a resumed run must match."""


class DatasetError(ValueError):
    """The dataset file as a whole cannot be used."""


class RowError(ValueError):
    """One row cannot be used; it is reported in the results and the run goes on."""


def read_dataset(path) -> list[dict]:
    """The rows of a JSONL dataset, each with ``_index`` and ``id``; one clear error if unusable."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"dataset file {path} does not exist; give a JSONL file of "
                           '{"image": ..., "question": ..., "answer"?: ..., "box"?: [x0, y0, x1, y1]} rows')
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            row = {"_parse_error": f"line {number} is not JSON: {err.msg}"}
        if not isinstance(row, dict):
            row = {"_parse_error": f"line {number} is not a JSON object"}
        row["_index"] = len(rows)
        row["id"] = str(row.get("id", len(rows)))
        rows.append(row)
    if not rows:
        raise DatasetError(f"dataset file {path} has no rows")
    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise DatasetError(f"dataset file {path} has duplicate ids; ids must be unique for resuming")
    return rows


def load_row(row: dict, root: Path):
    """``(image, question, answer, box)`` of a row, or :class:`RowError` naming what is wrong."""
    from PIL import Image, UnidentifiedImageError

    if "_parse_error" in row:
        raise RowError(row["_parse_error"])
    question = row.get("question")
    if not isinstance(question, str) or not question.strip():
        raise RowError("row has no question")
    if not row.get("image"):
        raise RowError("row has no image")
    image_path = (root / row["image"]) if not Path(row["image"]).is_absolute() else Path(row["image"])
    if not image_path.is_file():
        raise RowError(f"image file {image_path} does not exist")
    try:
        with Image.open(image_path) as handle:
            image = handle.convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise RowError(f"image file {image_path} cannot be read: {err}") from err
    box = row.get("box")
    if box is not None:
        width, height = image.size
        if (len(box) != 4 or not (0 <= box[0] < box[2] <= width and 0 <= box[1] < box[3] <= height)):
            raise RowError(f"box {box} is not inside the {width}x{height} image (x0 < x1 <= width, y0 < y1 <= height)")
    answer = row.get("answer")
    return image, question, answer, box


class ResultsFile:
    """Append-only JSONL results with crash-safe resume (see the module docstring).

    With ``header`` (see :func:`results_header`) a new file starts with it and an existing one
    must carry the same task, options and model, else :class:`DatasetError`.
    """

    def __init__(self, path, header: dict | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        self.header: dict | None = None
        if self.path.exists():
            self._recover()
        if header is not None:
            self._check_or_write_header(header)

    def _recover(self) -> None:
        data = self.path.read_bytes()
        keep = 0
        for line in data.splitlines(keepends=True):
            if not line.endswith(b"\n"):
                break  # torn write from a killed run
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                break
            keep += len(line)
            if isinstance(row, dict) and HEADER_KEY in row:
                self.header = row
            elif isinstance(row, dict) and "id" in row:
                self.done.add(str(row["id"]))
            else:
                raise DatasetError(f"{self.path} is not a mech_vqa results file (a line without an id); "
                                   "give --out a new file name")
        if keep != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)

    def _check_or_write_header(self, header: dict) -> None:
        header = json.loads(dumps_strict(header))  # compared as it reads back from the file
        if self.header is None and self.done:
            raise DatasetError(f"{self.path} has rows but no header saying which task, options and model made "
                               "them (an older mech_vqa or another program wrote it); give --out a new file name")
        if self.header is None:
            self._write(header)
            self.header = header
            return
        differ = [key for key in COMPARED if self.header.get(key) != header.get(key)]
        if differ:
            was = ", ".join(f"{key} {json.dumps(self.header.get(key))}" for key in differ)
            now = ", ".join(f"{key} {json.dumps(header.get(key))}" for key in differ)
            raise DatasetError(f"{self.path} was written with {was}; this run has {now}. Rows of different "
                               "settings must not mix: give --out a new file name, or rerun with the file's "
                               "settings to resume it")

    def _write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(dumps_strict(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def append(self, row: dict) -> None:
        if str(row["id"]) in self.done:
            return
        self._write(row)
        self.done.add(str(row["id"]))

    def rows(self) -> list[dict]:
        return read_results(self.path)


def check_resumable(results_path, task: str, options: dict, shard=None) -> None:
    """Fail before a model loads when ``results_path`` (this shard's file of it) was written by
    another task or other options (the model itself is compared once loaded, by :class:`ResultsFile`)."""
    from .sharding import Shard

    shard = shard or Shard()
    path = shard.path(results_path)
    if not path.is_file() or path.stat().st_size == 0:
        return
    existing = ResultsFile(path)
    if existing.header is None:
        if existing.done:
            existing._check_or_write_header({})  # the "no header" error
        return
    wanted = json.loads(dumps_strict({"task": task, "options": strict_json(options, record=False),
                                      "shard": shard.to_dict()}))
    existing._check_or_write_header({**wanted, "model": existing.header.get("model")})


def model_identity(vqa) -> dict:
    """What a results header records of the model: its name (``organism`` for the shipped one) and dtype."""
    from .organism import ORGANISM_DIR

    name = str(vqa.name)
    try:
        if Path(name).resolve() == Path(ORGANISM_DIR).resolve():
            name = "organism"
    except OSError:
        pass
    dtype = next(vqa.model.parameters()).dtype
    return {"name": name, "dtype": str(dtype).removeprefix("torch.")}


def results_header(vqa, task: str, options: dict, dataset_path, shard=None, n_items: int | None = None) -> dict:
    """The first line of a results file: the format, task, task options, model, dataset (path,
    SHA-256 of its bytes, number of items run) and, for a sharded run, the shard."""
    from . import __version__
    from .sharding import Shard, dataset_fingerprint

    shard = shard or Shard()
    return {HEADER_KEY: FORMAT_VERSION, "task": task, "options": strict_json(options, record=False),
            "model": model_identity(vqa), "shard": shard.to_dict(), "dataset": str(dataset_path),
            "dataset_sha256": dataset_fingerprint(dataset_path), "n_items": n_items, "mech_vqa": __version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def read_results_file(path) -> tuple[dict | None, list[dict]]:
    """``(header, rows)`` of a results file (header None for files without one)."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"results file {path} does not exist; run `mech-vqa run` first")
    header, rows = None, []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            break
        if isinstance(row, dict) and HEADER_KEY in row:
            header = row
        else:
            rows.append(row)
    if rows and not any(isinstance(r, dict) and "status" in r for r in rows):
        raise DatasetError(f"{path} is not a results file: its rows have no status, so it looks like a dataset. "
                           f"Run a task on it first (`mech-vqa run compare {path} --out results.jsonl`) and "
                           "summarise the results file")
    return header, rows


def read_results(path) -> list[dict]:
    """The rows of a results file (without its header)."""
    return read_results_file(path)[1]


def run_dataset(vqa, dataset_path, results_path, task: str | Callable = "ablate", *, limit: int | None = None,
                progress: bool = True, shard=None, **task_kwargs) -> dict:
    """Run ``task`` on every row not yet in ``results_path``; returns counts ``{done, skipped, errors}``.

    With ``shard`` (a :class:`~mech_vqa.sharding.Shard`, e.g. from
    :func:`~mech_vqa.sharding.resolve_shard`) only that shard's rows run, into the shard's own file
    beside ``results_path`` (``counts["out"]`` names it); :func:`~mech_vqa.sharding.merge_shards`
    joins the shards.
    """
    from .sharding import Shard

    from .tasks import TASKS

    if isinstance(task, str) and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    task_fn = TASKS[task] if isinstance(task, str) else task
    task_name = task if isinstance(task, str) else task_fn.__name__
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"limit must be a whole number >= 0 (run the first N rows), got {limit!r}; "
                         "leave it out to run every row")
    shard = shard or Shard()
    rows = read_dataset(dataset_path)[:limit]
    n_items = len(rows)
    rows = shard.select(rows)
    root = Path(dataset_path).resolve().parent
    results_file = shard.path(results_path)
    header = results_header(vqa, task_name, task_kwargs, dataset_path, shard, n_items)
    results = ResultsFile(results_file, header=header)
    pending = [row for row in rows if row["id"] not in results.done]
    counts = {"done": 0, "skipped": len(rows) - len(pending), "errors": 0}
    # the bar counts only the items left, so its rate and time left are those of this run
    desc = task_name + (f" shard {shard}" if shard.sharded else "")
    for row in tqdm(pending, desc=desc, disable=not progress):
        start = time.perf_counter()
        base = {"id": row["id"], "index": row["_index"], "image": row.get("image"), "question": row.get("question")}
        try:
            image, question, answer, box = load_row(row, root)
            out = task_fn(vqa, image=image, question=question, answer=answer, box=box, row=row, **task_kwargs)
            record = {**base, "status": "ok", **out}
        except (RowError, ValueError) as err:  # bad input in this row (the model rejects it too)
            record = {**base, "status": "error", "error": str(err)}
            counts["errors"] += 1
        record["runtime_s"] = time.perf_counter() - start
        results.append(record)
        counts["done"] += 1
    if shard.sharded:
        counts.update(shard=str(shard), out=str(results_file))
    return counts
