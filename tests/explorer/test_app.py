"""The explorer app without a browser: upload checks, per-tab sessions, knock-outs, exports, HTTP errors."""

from __future__ import annotations

import io
import json
import threading
import time
import urllib.error
import urllib.request
import zipfile

import pytest
from PIL import Image

from mech_vqa.explorer import app
from mech_vqa.explorer.app import Explorer, UserError, make_server, read_upload


def _png(mode: str = "RGB", size=(16, 12), noise: bool = False) -> bytes:
    import numpy as np

    buffer = io.BytesIO()
    image = Image.fromarray(np.random.randint(0, 255, (*size[::-1], 3), dtype=np.uint8)) if noise else Image.new(mode, size)
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_uploads_that_are_not_usable_images_get_one_clear_message(monkeypatch):
    with pytest.raises(UserError, match="not an image"):
        read_upload(b"%PDF-1.4 not a picture")
    with pytest.raises(UserError, match="empty"):
        read_upload(b"")
    with pytest.raises(UserError, match="16-bit or floating point"):
        read_upload(_png("I;16"))
    with pytest.raises(UserError, match="truncated or corrupt"):
        data = _png(size=(64, 64), noise=True)
        read_upload(data[:len(data) // 2])
    monkeypatch.setattr(app, "MAX_PIXELS", 100)
    with pytest.raises(UserError, match="16 x 12 pixels .*downscale"):
        read_upload(_png())
    monkeypatch.setattr(app, "MAX_UPLOAD_BYTES", 10)
    with pytest.raises(UserError, match="MB; the explorer takes images up to"):
        read_upload(_png())


def test_uploads_in_other_modes_become_rgb_with_a_note():
    image, note = read_upload(_png("RGBA"))
    assert image.mode == "RGB" and image.size == (16, 12) and "RGBA" in note
    image, note = read_upload(_png("L"))
    assert image.mode == "RGB" and "mode L" in note
    assert read_upload(_png())[1] == ""


def _wait(explorer: Explorer, session: str, job: dict, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = explorer.job(session, job["id"])
        if state["state"] in ("done", "error"):
            return state
        time.sleep(0.05)
    raise AssertionError(f"job {job} did not finish in {timeout} s")


@pytest.fixture(scope="module")
def explorer(organism_vqa):
    explorer = Explorer(organism_vqa, methods=["mechanistic"])
    yield explorer
    explorer.worker.shutdown(wait=True)


def test_two_tabs_keep_their_own_answer_and_maps(explorer):
    first, second = "tab-one-0001", "tab-two-0002"
    one = _wait(explorer, first, explorer.ask(first, {"item": 0}))
    two = _wait(explorer, second, explorer.ask(second, {"item": 1}))
    assert one["state"] == two["state"] == "done", (one, two)
    assert one["payload"]["question"] == explorer.items[0]["question"]
    assert two["payload"]["question"] == explorer.items[1]["question"]
    # a token computed in the second tab does not appear in the first
    _wait(explorer, second, explorer.token(second, {"token": 0}))
    assert "0" in explorer.session(second).view.payload["per_token"]
    assert "0" not in explorer.session(first).view.payload["per_token"]
    assert explorer.session(first).view.payload["question"] == explorer.items[0]["question"]
    with pytest.raises(UserError, match="no job"):
        explorer.job(first, two["id"])  # one tab cannot read another's job


def test_knocking_out_the_scaffold_head_changes_the_answer(explorer, organism_vqa):
    """The organism reads colours through its scaffolded head L2H0: zeroing it changes the answer word,
    zeroing its neighbour L2H1 does not (data/organism's ground truth)."""
    session = "tab-knock-0003"
    assert _wait(explorer, session, explorer.ask(session, {"item": 0}))["state"] == "done"
    clean = explorer.session(session).view.inp.answer
    knock = _wait(explorer, session, explorer.knock(session, {"knockouts": ["L2H0"]}))["knockout"]
    assert knock["clean_answer"] == clean and knock["knocked_out"] == ["L2H0"]
    assert knock["changed"] and knock["answer"].split()[:-1] == clean.split()[:-1]
    assert knock["answer"].split()[-1] != clean.split()[-1]
    assert not _wait(explorer, session, explorer.knock(session, {"knockouts": ["L2H1"]}))["knockout"]["changed"]
    knock = _wait(explorer, session, explorer.knock(session, {"knockouts": ["L2H0", "L3.mlp"]}))["knockout"]
    from mech_vqa.interventions import zero_block, zero_head
    from mech_vqa.methods.ablation import Ablation, ablate

    view = explorer.session(session).view
    reference = ablate(organism_vqa, view.inp, [Ablation("x", (zero_head(2, 0), zero_block(3, "mlp")), layer=2)],
                       progress=False)
    assert knock["delta"] == [round(float(v), 4) for v in reference.delta[0]]
    with pytest.raises(UserError, match="neither a head"):
        explorer.knock(session, {"knockouts": ["head 2"]})
    with pytest.raises(IndexError):
        explorer.knock(session, {"knockouts": ["L99H0"]})


def test_http_errors_are_messages_and_exports_are_files(explorer):
    server = make_server(explorer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    session = "tab-http-0004"
    try:
        request = urllib.request.Request(base + "/api/upload", data=b"not an image", method="POST",
                                         headers={"X-Session": session})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        body = caught.value.read().decode()
        assert caught.value.code == 400 and "not an image" in json.loads(body)["error"] and "Traceback" not in body
        request = urllib.request.Request(base + "/api/ask", data=b"{not json", method="POST",
                                         headers={"X-Session": session})
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=30)
        assert "not JSON" in json.loads(caught.value.read())["error"]
        with pytest.raises(urllib.error.HTTPError) as caught:  # no answer yet: a message, not a crash
            urllib.request.urlopen(f"{base}/api/export.html?session={session}", timeout=30)
        assert "ask a question first" in json.loads(caught.value.read())["error"]
        _wait(explorer, session, explorer.ask(session, {"item": 2}))
        with urllib.request.urlopen(f"{base}/api/export.zip?session={session}", timeout=60) as response:
            names = zipfile.ZipFile(io.BytesIO(response.read())).namelist()
        assert "view.html" in names and any(n.endswith("_explanation.json") for n in names)
        assert any(n.endswith(".safetensors") for n in names)
    finally:
        server.shutdown()
        server.server_close()
