"""Dataset runs: one task per item of a JSONL file, results appended as they are computed.

Input rows: ``{"image": path (relative to the JSONL file), "question": str, "answer": str?,
"answer_word": str?, "box": [x0, y0, x1, y1]? (original pixels), "id": str?}``.

Every finished item appends exactly one JSON line to the results file (flushed and fsynced), so a
run killed at any moment resumes where it stopped: on start the results file is read, a torn last
line is cut off, and items already present are skipped — no row lost, none duplicated. A bad row
(missing or unreadable image, no question, a box outside the image) becomes an ``error`` row and
the run goes on.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from .results.base import to_jsonable


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
    """Append-only JSONL results with crash-safe resume (see the module docstring)."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set[str] = set()
        if self.path.exists():
            self._recover()

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
            self.done.add(str(row["id"]))
        if keep != len(data):
            with open(self.path, "r+b") as handle:
                handle.truncate(keep)

    def append(self, row: dict) -> None:
        if str(row["id"]) in self.done:
            return
        line = json.dumps(row, default=to_jsonable) + "\n"
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())
        self.done.add(str(row["id"]))

    def rows(self) -> list[dict]:
        return read_results(self.path)


def read_results(path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"results file {path} does not exist; run `mech-vqa run` first")
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return rows


def run_dataset(vqa, dataset_path, results_path, task: str | Callable = "ablate", *, limit: int | None = None,
                progress: bool = True, **task_kwargs) -> dict:
    """Run ``task`` on every row not yet in ``results_path``; returns counts ``{done, skipped, errors}``."""
    from .tasks import TASKS

    if isinstance(task, str) and task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(TASKS)}")
    task_fn = TASKS[task] if isinstance(task, str) else task
    rows = read_dataset(dataset_path)[:limit]
    root = Path(dataset_path).resolve().parent
    results = ResultsFile(results_path)
    counts = {"done": 0, "skipped": 0, "errors": 0}
    for row in tqdm(rows, desc=f"{task if isinstance(task, str) else task_fn.__name__}", disable=not progress):
        if row["id"] in results.done:
            counts["skipped"] += 1
            continue
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
    return counts
