"""Typed results: dataclasses holding tensors and metadata, with the same verbs everywhere.

Every result has ``topk``, ``to_dataframe``, ``save``/``load`` and ``plot(ax=None)``. Saving writes
``<path>.safetensors`` (every tensor field) and ``<path>.json`` (every other field plus the class
name). Loading reads those two files only: no pickle, no code executed; the class is looked up in
a registry of result types by name.
"""

from __future__ import annotations

import dataclasses
import json
import math
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
        if "__repr__" not in cls.__dict__:  # set before @dataclass runs, so it keeps this short form
            cls.__repr__ = Result.__repr__

    def __repr__(self) -> str:
        """One line: the type and each field in brief (tensors by shape, long lists by length)."""
        parts = [f"{field.name}={brief(getattr(self, field.name))}" for field in dataclasses.fields(self)
                 if getattr(self, field.name) is not None]
        return f"{type(self).__name__}({', '.join(parts)})"

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
        json_path.write_text(dumps_strict({"type": type(self).__name__, "fields": meta}, indent=1))
        return json_path

    @classmethod
    def load(cls, path) -> Result:
        """Load a saved result (any registered type when called on :class:`Result`)."""
        from safetensors.torch import load_file

        tensor_path, json_path = _paths(path)
        if not json_path.exists():
            raise FileNotFoundError(f"no saved result at {json_path}")
        payload = loads_strict(json_path.read_text())
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

    # ---------------------------------------------------------------- interactive views
    def to_html(self, path=None, **kwargs) -> str:
        """A self-contained, offline HTML view (see :mod:`mech_vqa.explorer`); written to ``path`` when given."""
        from ..explorer.html import to_html

        return to_html(self, path, **kwargs)

    def _repr_html_(self) -> str | None:
        """Jupyter's rich display: the same view, kept small (large parts left out, with a note).

        A view that cannot be drawn warns and returns None, so the notebook shows the plain ``repr``."""
        from ..explorer.html import repr_html

        try:
            return repr_html(self)
        except Exception as err:  # a display hook must not break the notebook's output
            import warnings

            warnings.warn(f"no HTML view of this {type(self).__name__} ({type(err).__name__}: {err}); "
                          "showing its repr", stacklevel=2)
            return None


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
    json_path.write_text(dumps_strict(payload, indent=1))
    return json_path


def load_bundle(path, type_name: str) -> tuple[dict, dict]:
    """``(parts, payload)`` of a bundle written by :func:`save_bundle` (no code executed)."""
    _, json_path = _paths(path)
    if not json_path.exists():
        raise FileNotFoundError(f"no saved {type_name} at {json_path}")
    payload = loads_strict(json_path.read_text())
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


NON_FINITE_KEY = "non_finite"
"""Where :func:`strict_json` records the values it wrote as null: ``{"a.b.0": "NaN", ...}``."""


def strict_json(value, *, record: bool = True):
    """``value`` made of plain JSON types only, every NaN / infinity replaced by None.

    JSON has no NaN or infinity (``json.dumps`` writes bare ``NaN``, which jq, browsers and most
    readers reject). With ``record``, a top-level dict gains ``non_finite``: the dotted path of each
    replaced value and what it was (``"NaN"``, ``"inf"``, ``"-inf"``), so the reason is kept and
    :func:`restore_non_finite` can put the values back. Tensors, numpy values, dataclasses, sets and
    tuples are converted as by :func:`to_jsonable`.
    """
    found: dict[str, str] = {}

    def walk(item, path: str):
        if isinstance(item, float):
            if math.isfinite(item):
                return item
            found[path] = "NaN" if math.isnan(item) else ("inf" if item > 0 else "-inf")
            return None
        if item is None or isinstance(item, (str, bool, int)):
            return item
        if isinstance(item, dict):
            return {str(k): walk(v, f"{path}.{k}" if path else str(k)) for k, v in item.items()}
        if isinstance(item, (list, tuple, set)):
            return [walk(v, f"{path}.{i}" if path else str(i)) for i, v in enumerate(item)]
        return walk(to_jsonable(item), path)

    out = walk(value, "")
    if record and found and isinstance(out, dict):
        out[NON_FINITE_KEY] = {**out.get(NON_FINITE_KEY, {}), **found}
    return out


def dumps_strict(value, **kwargs) -> str:
    """``json.dumps`` of :func:`strict_json` (``allow_nan=False``: a stray NaN is an error, never written)."""
    return json.dumps(strict_json(value), allow_nan=False, **kwargs)


def restore_non_finite(payload):
    """Undo :func:`strict_json` on a loaded dict: put the recorded NaN / infinities back in place."""
    if not isinstance(payload, dict) or NON_FINITE_KEY not in payload:
        return payload
    for path, what in payload.pop(NON_FINITE_KEY).items():
        *parents, last = path.split(".")
        node = payload
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        value = float("nan") if what == "NaN" else float(what)
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return payload


def loads_strict(text: str):
    """``json.loads`` for files written by :func:`dumps_strict` (old files with bare NaN still read)."""
    return restore_non_finite(json.loads(text))


def brief(value) -> str:
    """A short description of a field for ``repr``: tensors by shape and dtype, long lists by length."""
    if torch.is_tensor(value):
        if value.numel() == 1:
            return f"{value.item():.4g}"
        return f"tensor{list(value.shape)}"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return repr(value) if len(value) <= 4 and len(repr(value)) <= 60 else f"[{len(value)} items]"
    if isinstance(value, dict):
        return repr(value) if len(repr(value)) <= 60 else f"{{{len(value)} keys}}"
    if isinstance(value, Result):
        return type(value).__name__
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def tensor_topk(values: torch.Tensor, k: int, largest: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over all entries of ``values``: ``(scores [k], multi-indices [k, values.dim()])``."""
    flat = values.flatten().float()
    k = min(k, flat.numel())
    scores, index = flat.topk(k, largest=largest)
    return scores, torch.stack(torch.unravel_index(index, values.shape), dim=1)
