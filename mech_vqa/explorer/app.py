"""``mech-vqa explore``: a local web app over one model, on 127.0.0.1, standard library only.

Pick one of the organism's evaluation images (or upload one), ask, see the greedy answer; click an
answer token to compute its maps (with progress), click a head for its position-level map, switch
methods, knock out heads or blocks and see the answer change, export the view as the static HTML
of :mod:`mech_vqa.explorer.html` or every result as files (a zip of safetensors + JSON).

Why no web framework: the page is the same script as the static views (``static/view.js``) plus a
small controller (``static/app.js``); ``http.server`` serves it and a JSON API. Nothing is fetched
from outside, nothing is reported anywhere (a framework's front end pulls fonts and assets from
CDNs and sends analytics), and no extra dependency is needed.

Each browser tab makes a random session id (``sessionStorage``) sent with every call; the server
keeps one :class:`Session` per id, so two tabs never see each other's image, answer or maps. The
model runs one job at a time (one worker thread); the page polls ``/api/job`` for progress.
"""

from __future__ import annotations

import io
import json
import re
import sys
import threading
import traceback
import uuid
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from .payload import model_label

MAX_UPLOAD_BYTES = 20_000_000
MAX_PIXELS = 40_000_000
MAX_SESSIONS = 32
MAX_QUESTION = 500
#: modes that cannot be turned into 8-bit RGB without inventing a display range
UNSUPPORTED_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")
DEFAULT_METHODS = ("mechanistic", "logit_lens", "raw_attention")
SESSION_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
APP_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data: blob:; "
           "connect-src 'self'")


class UserError(ValueError):
    """A problem with what the page sent: its message is shown in the page (HTTP 400)."""


def read_upload(data: bytes):
    """``(PIL RGB image, note)`` from uploaded bytes; a :class:`UserError` naming the problem otherwise."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UserError("the upload is empty: choose an image file (PNG, JPEG, GIF, BMP, WebP, TIFF)")
    if len(data) > MAX_UPLOAD_BYTES:
        raise UserError(f"the file is {len(data) / 1e6:.1f} MB; the explorer takes images up to "
                        f"{MAX_UPLOAD_BYTES // 1_000_000} MB: downscale or compress it first")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        raise UserError("this file is not an image the explorer can read: upload a PNG, JPEG, GIF, BMP, WebP "
                        "or TIFF file") from None
    if width * height > MAX_PIXELS:
        raise UserError(f"the image is {width} x {height} pixels ({width * height / 1e6:.0f} megapixels); the "
                        f"explorer takes at most {MAX_PIXELS // 1_000_000} megapixels: downscale it first")
    if min(width, height) < 2:
        raise UserError(f"the image is {width} x {height} pixels: too small to show anything")
    if image.mode in UNSUPPORTED_MODES:
        raise UserError(f"the image has {image.mode!r} pixels (16-bit or floating point); save it as an 8-bit "
                        "RGB or greyscale PNG or JPEG and upload that")
    try:
        image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise UserError(f"the image file is truncated or corrupt ({str(err).splitlines()[0] if str(err) else 'unreadable'})"
                        "; save it again and upload the new file") from None
    note = ""
    if getattr(image, "n_frames", 1) > 1:
        note = f"an animated image: its first of {image.n_frames} frames is used. "
    if image.mode != "RGB":
        mode = image.mode
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
            image = background
        else:
            image = image.convert("RGB")
        note += f"converted from mode {mode} to RGB (transparency on white)." if mode in ("RGBA", "LA", "PA", "P") \
            else f"converted from mode {mode} to RGB."
    return image, note.strip()


def eval_items(limit: int = 60) -> list[dict]:
    """The organism's evaluation items (image path absolute), for the picker."""
    from ..organism import EVAL_DIR

    path = EVAL_DIR / "items.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()][:limit]
    for row in rows:
        row["image"] = str(EVAL_DIR / row["image"])
    return rows


class Session:
    """One browser tab: its image, question, answer view and knock-outs."""

    def __init__(self):
        self.image = None
        self.image_note = ""
        self.item_box = None
        self.view = None
        self.knockout = None

    def require_view(self):
        if self.view is None:
            raise UserError("ask a question first (pick or upload an image, type a question, press Ask)")
        return self.view


class Job:
    def __init__(self, session_id: str):
        self.id = uuid.uuid4().hex
        self.session_id = session_id
        self.state = "queued"
        self.messages: list[str] = []
        self.error = ""

    def to_dict(self) -> dict:
        return {"id": self.id, "state": self.state, "messages": self.messages[-5:], "error": self.error}


class Explorer:
    """The app's state and actions, independent of HTTP (tests call it directly)."""

    def __init__(self, vqa, items: list[dict] | None = None, methods=DEFAULT_METHODS):
        self.vqa = vqa
        self.items = eval_items() if items is None else items
        self.methods = list(methods)
        self.sessions: OrderedDict[str, Session] = OrderedDict()
        self.jobs: OrderedDict[str, Job] = OrderedDict()
        self.lock = threading.Lock()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mech-vqa-explore")

    # ---------------------------------------------------------------------- sessions
    def session(self, session_id) -> Session:
        if not isinstance(session_id, str) or not SESSION_ID.match(session_id):
            raise UserError("missing or malformed session id: reload the page")
        with self.lock:
            if session_id not in self.sessions:
                self.sessions[session_id] = Session()
                while len(self.sessions) > MAX_SESSIONS:  # the least recently used tab's state goes
                    self.sessions.popitem(last=False)
            self.sessions.move_to_end(session_id)
            return self.sessions[session_id]

    def submit(self, session_id: str, work) -> dict:
        """Run ``work(say)`` on the worker thread; returns the job's first state for polling."""
        job = Job(session_id)
        with self.lock:
            self.jobs[job.id] = job
            while len(self.jobs) > 200:
                self.jobs.popitem(last=False)

        def run():
            job.state = "running"
            try:
                work(job.messages.append)
                job.state = "done"
            except (UserError, ValueError, IndexError, OSError, NotImplementedError) as err:
                job.error, job.state = str(err), "error"
            except Exception as err:  # the page gets one line; the server's console the traceback
                traceback.print_exc(file=sys.stderr)
                job.error, job.state = f"internal error ({type(err).__name__}: {err}); see the server's console", "error"

        self.worker.submit(run)
        return job.to_dict()

    def job(self, session_id: str, job_id) -> dict:
        job = self.jobs.get(str(job_id))
        if job is None or job.session_id != session_id:
            raise UserError(f"no job {job_id!r} for this tab")
        out = job.to_dict()
        if job.state == "done":
            session = self.session(session_id)
            out["payload"] = session.view.payload if session.view is not None else None
            out["knockout"] = session.knockout
        return out

    # ----------------------------------------------------------------------- actions
    def items_list(self) -> list[dict]:
        out = []
        for index, item in enumerate(self.items):
            out.append({"index": index, "question": item["question"], "answer": item.get("answer", ""),
                        "box": item.get("box")})
        return out

    def upload(self, session_id: str, data: bytes) -> dict:
        session = self.session(session_id)
        image, note = read_upload(data)
        session.image, session.image_note, session.item_box = image, note, None
        return {"ok": True, "width": image.width, "height": image.height, "note": note}

    def ask(self, session_id: str, body: dict) -> dict:
        from PIL import Image

        session = self.session(session_id)
        question = str(body.get("question") or "").strip()
        item_index = body.get("item")
        if item_index not in (None, ""):
            try:
                item = self.items[int(item_index)]
            except (ValueError, IndexError, TypeError):
                raise UserError(f"no evaluation item {item_index!r}: pick one of 0..{len(self.items) - 1}") from None
            session.image = Image.open(item["image"]).convert("RGB")
            session.item_box, session.image_note = item.get("box"), ""
            question = question or item["question"]
        if session.image is None:
            raise UserError("no image yet: pick an evaluation image or upload one")
        if not question:
            raise UserError("type a question first")
        if len(question) > MAX_QUESTION:
            raise UserError(f"the question has {len(question)} characters; keep it under {MAX_QUESTION}")
        methods = self._methods(body)
        curves = bool(body.get("curves"))
        image, item_box = session.image, session.item_box

        def work(say):
            from .answer import AnswerView

            say("generating the greedy answer")
            inp = self.vqa.prepare(image, question)
            if inp.answer_positions.numel() == 0:
                raise UserError("the model's greedy answer is empty: nothing to explain; ask another question")
            box = inp.box_to_model(item_box) if item_box is not None else None
            view = AnswerView(self.vqa, inp, methods, box=box, curves=curves)
            say("logit lens of the image tokens")
            view.compute_lens()
            last = view.n_tokens - 1  # the answer word comes last in the organism's answers
            view.compute_token(last, progress=say)
            view.payload["selected"] = last
            if session.image_note:
                view.payload["notes"].append(session.image_note)
            session.view, session.knockout = view, None

        return self.submit(session_id, work)

    def _methods(self, body: dict) -> list[str]:
        from ..compare import METHODS

        methods = body.get("methods") or self.methods
        if not isinstance(methods, list) or not all(isinstance(m, str) for m in methods):
            raise UserError("methods must be a list of method names")
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise UserError(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
        return ["mechanistic"] + [m for m in methods if m != "mechanistic"]

    def _index(self, body: dict, key: str = "token") -> int:
        try:
            return int(body.get(key))
        except (TypeError, ValueError):
            raise UserError(f"{key} must be a whole number") from None

    def token(self, session_id: str, body: dict) -> dict:
        view = self.session(session_id).require_view()
        index = self._index(body)
        view._check_index(index)
        methods = self._methods(body) if body.get("methods") else None
        if methods is not None:
            view.methods = methods
        curves = body.get("curves")
        if curves is not None:
            view.curves = bool(curves)
        return self.submit(session_id, lambda say: view.compute_token(index, progress=say))

    def head(self, session_id: str, body: dict) -> dict:
        view = self.session(session_id).require_view()
        index, layer, head = self._index(body), self._index(body, "layer"), self._index(body, "head")
        return self.submit(session_id, lambda say: view.compute_head(index, layer, head, progress=say))

    def methods(self, session_id: str, body: dict) -> dict:
        view = self.session(session_id).require_view()
        index, methods, curves = self._index(body), self._methods(body), bool(body.get("curves"))
        view.methods, view.curves = methods, curves

        def work(say):
            if str(index) not in view.payload["per_token"]:
                view.compute_token(index, progress=say)
                return
            for name in methods:
                if name not in view.maps.get(index, {}):
                    view.compute_method(index, name, progress=say)
            if curves:
                done = {c["name"] for c in view.payload["per_token"][str(index)].get("curves", [])}
                for name in view.maps[index]:
                    if name not in done:
                        view.compute_curve(index, name, progress=say)

        return self.submit(session_id, work)

    def knock(self, session_id: str, body: dict) -> dict:
        """The answer with the listed heads / blocks zeroed: the new greedy answer and each token's change."""
        from ..interventions import zero_block, zero_head

        session = self.session(session_id)
        view = session.require_view()
        adapter = self.vqa.adapter
        edits, names = [], []
        for spec in body.get("knockouts") or []:
            text = str(spec).strip()
            head = re.fullmatch(r"L(\d+)H(\d+)", text)
            block = re.fullmatch(r"L(\d+)\.(attn|mlp)", text)
            if head:
                layer, index = int(head.group(1)), int(head.group(2))
                adapter.check_layer(layer)
                adapter.check_head(index)
                edits.append(zero_head(layer, index))
            elif block:
                adapter.check_layer(int(block.group(1)))
                edits.append(zero_block(int(block.group(1)), block.group(2)))
            else:
                raise UserError(f"knock-out {text!r} is neither a head (L2H0) nor a block (L1.attn, L3.mlp)")
            names.append(text)
        if not edits:
            raise UserError("choose at least one head or block to knock out")

        def work(say):
            say(f"answering with {', '.join(names)} zeroed")
            session.knockout = knockout_answer(self.vqa, view.inp, edits, names)

        return self.submit(session_id, work)

    def export_html(self, session_id: str, view_state: dict | None = None) -> str:
        """The static page of this tab's answer, opening on what the tab shows (``token``, ``method``, ``head``)."""
        view = self.session(session_id).require_view()
        payload = dict(view.payload)
        state = {key: value for key, value in (view_state or {}).items() if key in ("method", "head") and value}
        token = (view_state or {}).get("token")
        if token not in (None, "") and str(token).isdigit() and str(token) in payload["per_token"]:
            payload["selected"] = int(token)
            payload["state"] = state
        from .html import to_html

        return to_html(payload, title="one answer, token by token")

    def export_zip(self, session_id: str) -> bytes:
        import tempfile

        session = self.session(session_id)
        view = session.require_view()
        buffer = io.BytesIO()
        with tempfile.TemporaryDirectory() as folder, zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in view.save(folder):
                for file in Path(folder).glob(Path(path).stem + "*"):
                    archive.write(file, file.name)
            archive.writestr("view.html", view.to_html())
            if session.knockout is not None:
                archive.writestr("knockout.json", json.dumps(session.knockout, indent=1))
        return buffer.getvalue()


def knockout_answer(vqa, inp, edits, names) -> dict:
    """Greedy answer with ``edits`` applied during generation, and the original answer tokens' log-prob change."""
    import torch

    from ..hooks import HookSet, preserved_state
    from ..interventions import register_interventions
    from ..methods.ablation import Ablation, ablate

    with torch.no_grad(), preserved_state(vqa.model):
        hooks = HookSet()
        try:
            register_interventions(hooks, vqa.adapter, edits)
            answer = vqa.generate(inp.image, inp.question)
        finally:
            hooks.remove()
    result = ablate(vqa, inp, [Ablation("+".join(names), tuple(edits), layer=min(e.layer for e in edits),
                                        kind="knockout")], progress=False)
    tokens = [t["token"] for t in result.targets]
    return {"knocked_out": names, "answer": answer, "clean_answer": inp.answer, "changed": answer != inp.answer,
            "tokens": tokens, "delta": [round(float(v), 4) for v in result.delta[0]],
            "clean_logprob": [round(float(v), 4) for v in result.clean_logprob],
            "argmax_flipped": bool(result.flipped[0])}


# ---------------------------------------------------------------------------------- HTTP
def app_page() -> str:
    from .html import asset

    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n"
            f'<meta http-equiv="Content-Security-Policy" content="{APP_CSP}">\n'
            "<title>mech_vqa explorer</title>\n"
            f"<style>{asset('view.css')}\n{asset('app.css')}</style></head>\n<body>\n{asset('app.html')}\n"
            f"<script>{asset('view.js')}</script>\n<script>{asset('app.js')}</script>\n</body></html>\n")


class Handler(BaseHTTPRequestHandler):
    explorer: Explorer  # set on the subclass made by make_server
    server_version = "mech-vqa-explore"
    quiet = True

    def log_message(self, format, *args):  # noqa: A002 - the base class' name
        if not self.quiet:
            super().log_message(format, *args)

    def _send(self, status: int, body: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        for key, value in (extra or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def _json(self, value, status: int = 200) -> None:
        from ..results.base import dumps_strict

        self._send(status, dumps_strict(value).encode(), "application/json")

    def _guard(self, action) -> None:
        """Every request: a UserError -> 400 with its message; anything else -> 500 with one line, never a trace."""
        try:
            action()
        except UserError as err:
            self._json({"error": str(err)}, HTTPStatus.BAD_REQUEST)
        except (ValueError, IndexError) as err:
            self._json({"error": str(err)}, HTTPStatus.BAD_REQUEST)
        except Exception as err:
            traceback.print_exc(file=sys.stderr)
            self._json({"error": f"internal error ({type(err).__name__}); see the server's console"},
                       HTTPStatus.INTERNAL_SERVER_ERROR)

    def do_GET(self):  # noqa: N802 - http.server's name
        url = urlparse(self.path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        explorer = self.explorer

        def action():
            if url.path in ("/", "/index.html"):
                self._send(200, app_page().encode(), "text/html; charset=utf-8")
            elif url.path == "/api/items":
                self._json({"items": explorer.items_list(), "methods": explorer.methods,
                            "all_methods": _all_methods(), "model": model_label(explorer.vqa.name),
                            "layers": explorer.vqa.adapter.n_layers, "heads": explorer.vqa.adapter.n_heads})
            elif url.path == "/api/job":
                self._json(explorer.job(query.get("session", ""), query.get("id")))
            elif url.path == "/api/export.html":
                text = explorer.export_html(query.get("session", ""), query)
                self._send(200, text.encode(), "text/html; charset=utf-8",
                           {"Content-Disposition": 'attachment; filename="mech_vqa_view.html"'})
            elif url.path == "/api/export.zip":
                data = explorer.export_zip(query.get("session", ""))
                self._send(200, data, "application/zip",
                           {"Content-Disposition": 'attachment; filename="mech_vqa_results.zip"'})
            elif url.path == "/favicon.ico":
                self._send(204, b"", "image/x-icon")
            else:
                self._json({"error": f"no page {url.path}"}, HTTPStatus.NOT_FOUND)

        self._guard(action)

    def do_POST(self):  # noqa: N802
        url = urlparse(self.path)
        explorer = self.explorer

        def action():
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_UPLOAD_BYTES:
                self.rfile.read(min(length, MAX_UPLOAD_BYTES + 1))  # drain what we can, then refuse
                raise UserError(f"the file is {length / 1e6:.1f} MB; the explorer takes images up to "
                                f"{MAX_UPLOAD_BYTES // 1_000_000} MB: downscale or compress it first")
            data = self.rfile.read(length) if length else b""
            session_id = self.headers.get("X-Session", "")
            if url.path == "/api/upload":
                self._json(explorer.upload(session_id, data))
                return
            try:
                body = json.loads(data or b"{}")
            except ValueError:
                raise UserError("the request body is not JSON") from None
            if not isinstance(body, dict):
                raise UserError("the request body must be a JSON object")
            routes = {"/api/ask": explorer.ask, "/api/token": explorer.token, "/api/head": explorer.head,
                      "/api/methods": explorer.methods, "/api/knockout": explorer.knock}
            if url.path not in routes:
                self._json({"error": f"no action {url.path}"}, HTTPStatus.NOT_FOUND)
                return
            self._json(routes[url.path](session_id, body))

        self._guard(action)


def _all_methods() -> list[str]:
    from ..compare import METHODS

    return list(METHODS)


def make_server(explorer: Explorer, host: str = "127.0.0.1", port: int = 0) -> ThreadingHTTPServer:
    """A server for ``explorer`` on ``host:port`` (0: any free port); call ``serve_forever``."""
    handler = type("ExplorerHandler", (Handler,), {"explorer": explorer})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    return server


def serve(vqa, *, host: str = "127.0.0.1", port: int = 7860, open_browser: bool = False, verbose: bool = False) -> None:
    """Serve the explorer until interrupted (Ctrl-C)."""
    explorer = Explorer(vqa)
    Handler.quiet = not verbose
    server = make_server(explorer, host, port)
    url = f"http://{host}:{server.server_address[1]}/"
    print(f"mech-vqa explore: {vqa.name} at {url} (Ctrl-C stops)", flush=True)
    if open_browser:
        import webbrowser

        webbrowser.open(url)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        explorer.worker.shutdown(wait=False, cancel_futures=True)
