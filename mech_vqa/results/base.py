"""Typed results: dataclasses holding tensors and metadata, with the same verbs everywhere.

Every result has ``topk``, ``to_dataframe``, ``save``/``load`` and ``plot(ax=None)``. Saving writes
``<path>.safetensors`` (every tensor field) and ``<path>.json`` (every other field plus the class
name). Loading reads those two files only: no pickle, no code executed; the class is looked up in
a registry of result types by name.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import torch

_REGISTRY: dict[str, type[Result]] = {}


def _paths(path) -> tuple[Path, Path]:
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


@dataclasses.dataclass
class Result:
    """Base class. Subclasses are dataclasses; tensor fields go to safetensors, the rest to JSON."""

    kind: ClassVar[str] = "result"

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        _REGISTRY[cls.__name__] = cls

    # --------------------------------------------------------------------- save/load
    def save(self, path) -> Path:
        """Write ``<path>.safetensors`` and ``<path>.json``; returns the JSON path."""
        from safetensors.torch import save_file

        tensor_path, json_path = _paths(path)
        tensor_path.parent.mkdir(parents=True, exist_ok=True)
        tensors, meta = {}, {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if torch.is_tensor(value):
                tensors[field.name] = value.detach().cpu().contiguous()
            else:
                meta[field.name] = value
        save_file(tensors, str(tensor_path))
        json_path.write_text(json.dumps({"type": type(self).__name__, "fields": meta}, indent=1, default=to_jsonable))
        return json_path

    @classmethod
    def load(cls, path) -> Result:
        """Load a saved result (any registered type when called on :class:`Result`)."""
        from safetensors.torch import load_file

        tensor_path, json_path = _paths(path)
        if not json_path.exists():
            raise FileNotFoundError(f"no saved result at {json_path}")
        payload = json.loads(json_path.read_text())
        type_name = payload.get("type")
        if type_name not in _REGISTRY:  # result types living outside this package register on import
            import importlib

            for module in ("mech_vqa.results", "mech_vqa.metrics", "mech_vqa.compare"):
                importlib.import_module(module)
        target = _REGISTRY.get(type_name)
        if target is None:
            raise ValueError(f"{json_path} holds an unknown result type {type_name!r}")
        if cls is not Result and not issubclass(target, cls):
            raise TypeError(f"{json_path} holds a {type_name}, not a {cls.__name__}")
        if target.load.__func__ is not Result.load.__func__:  # a type with its own file layout
            return target.load(path)
        tensors = load_file(str(tensor_path)) if tensor_path.exists() else {}
        return target(**payload["fields"], **tensors)

    # ------------------------------------------------------------------------ verbs
    def topk(self, k: int = 10):
        raise NotImplementedError

    def to_dataframe(self):
        raise NotImplementedError

    def plot(self, ax=None, **kwargs):
        raise NotImplementedError


def save_bundle(path, type_name: str, parts: dict, meta: dict | None = None) -> Path:
    """Save a result made of other results: ``<path>.json`` (a manifest plus ``meta``) and one
    file pair per part (``<path>.<key>.json/.safetensors``). Parts that are None are skipped."""
    _, json_path = _paths(path)
    stem = json_path.with_suffix("")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    files = {}
    for key, part in parts.items():
        if part is not None:
            part.save(stem.with_name(f"{stem.name}.{key}"))
            files[key] = f"{stem.name}.{key}"
    payload = {"type": type_name, "parts": files, **(meta or {})}
    json_path.write_text(json.dumps(payload, indent=1, default=to_jsonable))
    return json_path


def load_bundle(path, type_name: str) -> tuple[dict, dict]:
    """``(parts, payload)`` of a bundle written by :func:`save_bundle` (no code executed)."""
    _, json_path = _paths(path)
    if not json_path.exists():
        raise FileNotFoundError(f"no saved {type_name} at {json_path}")
    payload = json.loads(json_path.read_text())
    if payload.get("type") != type_name:
        raise TypeError(f"{json_path} holds a {payload.get('type')}, not a {type_name}")
    parts = {key: Result.load(json_path.with_name(file)) for key, file in payload["parts"].items()}
    return parts, payload


def to_jsonable(value):
    """``json.dumps`` default for tensors, numpy values, dataclasses, sets and tuples."""
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    if hasattr(value, "tolist"):  # tensors and numpy arrays or scalars
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, (set, tuple)):
        return list(value)
    raise TypeError(f"cannot store {type(value).__name__} in a result's JSON")


def tensor_topk(values: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over all entries of ``values``: ``(scores [k], multi-indices [k, values.dim()])``."""
    flat = values.flatten().float()
    k = min(k, flat.numel())
    scores, index = flat.topk(k, largest=largest)
    return scores, torch.stack(torch.unravel_index(index, values.shape), dim=1)
