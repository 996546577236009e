"""Self-contained HTML of a result: ``to_html(result, path)`` and the Jupyter ``_repr_html_``.

The page is one file: the payload (:mod:`mech_vqa.explorer.payload`) as JSON, the view's script and
style inlined, the image as a data URI. A Content-Security-Policy forbids every fetch, so the file
behaves the same offline, from ``file://`` or attached to an e-mail. Result types without a linked
view get a generic page: their one-line summary, their ``topk`` table and their figure as a PNG.
"""

from __future__ import annotations

import base64
import html
import io
import json
import uuid
from functools import lru_cache
from importlib import resources
from pathlib import Path

from ..results.base import dumps_strict
from .payload import payload_of

#: no fetch of any kind: scripts and styles inline, images as data URIs
CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:"
#: a notebook cell's HTML larger than this drops the logit lens words, then the view (use to_html)
REPR_MAX_BYTES = 1_500_000


@lru_cache(maxsize=None)
def asset(name: str) -> str:
    """A file of ``mech_vqa/explorer/static`` (the view's script and style)."""
    return resources.files("mech_vqa.explorer").joinpath("static", name).read_text(encoding="utf-8")


def _script_json(payload: dict) -> str:
    """The payload as JSON safe inside a ``<script>`` element (no ``</script>`` can close it early)."""
    return dumps_strict(payload, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")


def fragment(payload: dict) -> str:
    """A ``<div>`` with the view, its data, style and script (for notebooks and the app)."""
    root = f"mv-{uuid.uuid4().hex[:10]}"
    return (f'<div id="{root}" class="mv-root"></div>\n<style>{asset("view.css")}</style>\n'
            f'<script type="application/json" id="{root}-data">{_script_json(payload)}</script>\n'
            f"<script>{asset('view.js')}\n(function(){{var r=document.getElementById('{root}');"
            f"window.MechVQA.render(r, JSON.parse(document.getElementById('{root}-data').textContent));}})();</script>")


def page(body: str, title: str) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{CSP}">\n'
            f"<title>{html.escape(title)}</title></head>\n<body>\n{body}\n</body></html>\n")


def generic_fragment(result, rows: int = 15, figure: bool = True) -> str:
    """Summary, ``topk`` table and figure of a result the explorer has no linked view for."""
    parts = [f"<h3>{html.escape(type(result).__name__)}</h3><pre>{html.escape(repr(result))}</pre>"]
    try:
        parts.append(result.topk(rows).to_html(max_rows=rows, float_format=lambda v: f"{v:.4g}"))
    except Exception as err:  # a result without a table still shows its summary
        parts.append(f"<p>(no table: {html.escape(type(err).__name__)}: {html.escape(str(err))})</p>")
    if figure:
        png = figure_png(result)
        if png:
            parts.append(f'<img alt="figure" style="max-width:100%" src="data:image/png;base64,{png}">')
    return '<div class="mv-root" style="font-family: system-ui, sans-serif">' + "\n".join(parts) + "</div>"


def figure_png(result) -> str | None:
    """``result.plot()`` as base64 PNG, or None when it has no figure."""
    import matplotlib

    matplotlib.use("Agg")  # never open a window from a notebook repr or a file export
    import matplotlib.pyplot as plt

    try:
        fig, _ = result.plot()
    except Exception:
        return None
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    finally:
        plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def to_html(result, path=None, *, title: str | None = None) -> str:
    """The standalone page of ``result`` (written to ``path`` when given); returns the HTML."""
    payload = result if isinstance(result, dict) else payload_of(result)
    title = title or (payload["title"] if payload else type(result).__name__)
    text = page(fragment(payload) if payload else generic_fragment(result), f"mech_vqa: {title}")
    if path is not None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return text


def _size(payload: dict) -> int:
    return len(json.dumps(payload, separators=(",", ":"), default=str))


def repr_html(result, max_bytes: int = REPR_MAX_BYTES) -> str:
    """The notebook view: the linked view when it fits in ``max_bytes``, lighter parts dropped first."""
    payload = payload_of(result)
    if payload is None:
        return generic_fragment(result, figure=False)
    if _size(payload) > max_bytes and payload.get("lens") and hasattr(result, "top_ids"):
        from .payload import lens_part

        payload["lens"] = lens_part(result, k=1)
        payload["notes"].append("notebook view: top-1 word per cell only; result.to_html(path) keeps the top-k")
    if _size(payload) > max_bytes:
        for part in payload["per_token"].values():
            part.pop("head_maps", None)
            part.pop("head_text", None)
        payload["lens"] = None
        payload["notes"].append("notebook view: head maps and the logit lens left out to keep the notebook small; "
                                "result.to_html(path) writes the whole view")
    if _size(payload) > max_bytes:
        return (generic_fragment(result, figure=False) +
                f"<p>The linked view of this result is larger than {max_bytes // 1000} kB; "
                "<code>result.to_html('view.html')</code> writes it to a file.</p>")
    return fragment(payload)
