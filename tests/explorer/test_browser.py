"""The explorer in a real headless Chromium: the static views opened offline from file://, and the app.

Each test checks what a reader sees (the map canvas' pixels and the DOM), not only the data behind it,
and saves a screenshot of every view under docs/img/explorer/ (MECH_VQA_SCREENSHOTS overrides), the
README's pictures. Skipped, with the reason, only where chromium / chromium-driver / selenium are missing.
"""

from __future__ import annotations

import os
import threading
import urllib.request
from pathlib import Path

import pytest
import torch

from explorer_browser import canvas_pixels, console_errors, fetched, offline, online

from mech_vqa.compare import Comparison
from mech_vqa.explorer import answer_view
from mech_vqa.explorer.app import Explorer, make_server
from mech_vqa.methods.ablation import ablate, block_ablations, head_ablations
from mech_vqa.methods.logit_lens import logit_lens
from mech_vqa.methods.raw_attention import answer_attention

SHOTS = Path(os.environ.get("MECH_VQA_SCREENSHOTS", Path(__file__).resolve().parents[2] / "docs" / "img" / "explorer"))
TIMEOUT = 120


def _by(driver, css: str):
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, css)


def _wait(driver, condition, timeout: float = TIMEOUT):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    # the app re-renders the view when a computation ends: elements found a moment ago go stale
    ignored = (NoSuchElementException, StaleElementReferenceException)
    return WebDriverWait(driver, timeout, poll_frequency=0.1, ignored_exceptions=ignored).until(lambda d: condition(d))


def _shown(driver) -> str:
    return _by(driver, "canvas.mv-map").get_attribute("data-shown")


def _drawn(driver, shown: str | None = None) -> str:
    """Wait until the map canvas shows ``shown`` over the loaded image; return its pixels."""
    _wait(driver, lambda d: _by(d, "canvas.mv-map").get_attribute("data-drawn") == "image"
          and (shown is None or _shown(d) == shown))
    return canvas_pixels(driver)


def _shot(driver, name: str, height: int = 1000) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    driver.set_window_size(1280, height)
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def _open_offline(driver, path: Path) -> None:
    offline(driver)
    driver.get(path.as_uri())
    _wait(driver, lambda d: d.execute_script("return document.readyState") == "complete")


def test_static_views_offline(chromium, organism_vqa, organism_answer, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.support.ui import Select

    inp, box = organism_answer
    last = inp.answer_positions.numel() - 1
    view = answer_view(organism_vqa, inp, methods=["mechanistic", "raw_attention"], box=box, tokens=[4, last])
    view.compute_curve(last, "mechanistic", step_fraction=0.1, n_orders=1)
    path = tmp_path / "answer.html"
    view.to_html(path)
    console_errors(chromium)  # start from an empty log
    _open_offline(chromium, path)
    first = _drawn(chromium, f"{last}|mechanistic")
    # an answer token: the map changes (pixels and what the canvas says it shows)
    _by(chromium, '.mv-token[data-index="4"]').click()
    second = _drawn(chromium, "4|mechanistic")
    assert second != first
    # a head: its position-level map
    _by(chromium, '.mv-head[data-layer="2"][data-head="0"]').click()
    third = _drawn(chromium, "4|head L2H0")
    assert third != second and "mv-selected" in _by(chromium, '.mv-head[data-layer="2"][data-head="0"]').get_attribute("class")
    # another method, then the opacity
    _by(chromium, '.mv-token[data-index="%d"]' % last).click()
    Select(_by(chromium, "select.mv-method")).select_by_value("raw_attention")
    fourth = _drawn(chromium, f"{last}|raw_attention")
    chromium.execute_script("var s = document.querySelector('input.mv-opacity'); s.value = '0.2';"
                            "s.dispatchEvent(new Event('input'));")
    assert canvas_pixels(chromium) != fourth
    # the logit lens: top-k words on hover; the curves of the explained token
    ActionChains(chromium).move_to_element(_by(chromium, '.mv-lens-cell[data-row="1"][data-col="1"]')).perform()
    assert "1. " in _by(chromium, ".mv-lens .mv-hover").text and "p=" in _by(chromium, ".mv-lens .mv-hover").text
    Select(_by(chromium, "select.mv-method")).select_by_value("mechanistic")
    assert _by(chromium, "polyline.mv-curve-deletion").get_attribute("points")
    assert console_errors(chromium) == [] and fetched(chromium) == []
    chromium.execute_script("var s = document.querySelector('input.mv-opacity'); s.value = '1';"
                            "s.dispatchEvent(new Event('input'));")
    _shot(chromium, "answer", 1500)

    # the single-result views: an explanation, a comparison, the logit lens, ablations
    explanation = view.explanations[last]
    lens = logit_lens(organism_vqa, inp, word=inp.str_tokens[-1], k=3)
    ablation = ablate(organism_vqa, inp, head_ablations(organism_vqa) + block_ablations(organism_vqa), progress=False)
    maps = view.maps[last]
    comparison = Comparison(maps=dict(maps), table=[{"method": name, "pointing_game": m.pointing_game(box),
                                                     "in_box_share": m.in_box_share(box)} for name, m in maps.items()],
                            info={"targets": [inp.target(last).to_dict()], "answer": inp.answer,
                                  "question": inp.question})
    attention = answer_attention(organism_vqa, inp, box=box)
    for name, result in (("explanation", explanation), ("comparison", comparison), ("logit_lens", lens),
                         ("raw_attention", attention), ("ablation", ablation)):
        page = tmp_path / f"{name}.html"
        result.to_html(page)
        _open_offline(chromium, page)
        if name != "ablation":
            _drawn(chromium)
        assert console_errors(chromium) == [], name
        assert fetched(chromium) == [], name
        if name == "raw_attention":  # a head's own attention map, on the answer word
            _by(chromium, f'.mv-token[data-index="{last}"]').click()
            before = _drawn(chromium, f"{last}|raw_attention")
            _by(chromium, '.mv-head[data-layer="2"][data-head="0"]').click()
            assert _drawn(chromium, f"{last}|head L2H0") != before
        _shot(chromium, name, 1100)
    # the ablation view: clicking the scaffolded head shows its change per token
    _by(chromium, 'td.mv-cell[data-ablation="8"]').click()
    assert _by(chromium, ".mv-ablation-detail").text.startswith("L2H0: summed change")
    summed = _by(chromium, 'td.mv-cell[data-ablation="8"]').get_attribute("style")
    _by(chromium, f'.mv-token[data-index="{last + 1}"]').click()  # the answer word alone
    assert 'log p(" yellow")' in _by(chromium, ".mv-ablation h3").text.replace("'", '"') or \
        f'log p("{inp.str_tokens[-1]}")' in _by(chromium, ".mv-ablation h3").text
    assert _by(chromium, 'td.mv-cell[data-ablation="8"]').get_attribute("style") != summed


def test_app_in_chromium(chromium, organism_vqa, organism_eval_items, tmp_path):
    from selenium.webdriver.support.ui import Select

    explorer = Explorer(organism_vqa, methods=["mechanistic", "raw_attention"])
    server = make_server(explorer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    driver = chromium
    first_tab = driver.current_window_handle
    try:
        online(driver)
        console_errors(driver)
        driver.get(url)
        _wait(driver, lambda d: _by(d, "body").get_attribute("data-ready") == "1")

        def idle(d):
            return _by(d, "body").get_attribute("data-busy") == "0"

        _by(driver, "#ask").click()
        _wait(driver, lambda d: idle(d) and d.find_elements("id", "answer-text"))
        answer = _by(driver, "#answer-text").text
        assert answer == organism_vqa.generate(organism_eval_items[0]["picture"], organism_eval_items[0]["question"])
        last = len(answer.split()) - 1
        first = _drawn(driver, f"{last}|mechanistic")
        # a token not computed yet: computed live, then shown
        _by(driver, '.mv-token[data-index="4"]').click()
        second = _drawn(driver, "4|mechanistic")
        assert second != first and idle(driver)
        _by(driver, '.mv-head[data-layer="2"][data-head="0"]').click()
        assert _drawn(driver, "4|head L2H0") != second
        assert console_errors(driver) == []
        _shot(driver, "app", 1300)
        # knock out the organism's colour head: the answer changes
        Select(_by(driver, "#knock-choice")).select_by_value("L2H0")
        _by(driver, "#knock-add").click()
        _by(driver, "#knock-run").click()
        _wait(driver, lambda d: _by(d, "#knock-result").get_attribute("data-changed") is not None)
        assert _by(driver, "#knock-result").get_attribute("data-changed") == "1"
        # a bad upload: a message in the page, no stack trace
        bad = tmp_path / "notes.txt"
        bad.write_text("not a picture")
        _by(driver, "#upload").send_keys(str(bad))
        _wait(driver, lambda d: _by(d, "#message").text)
        assert "not an image" in _by(driver, "#message").text and "Traceback" not in driver.page_source
        session = driver.execute_script("return sessionStorage.getItem('mech-vqa-session')")

        # a second tab asks about another image; the first keeps its own
        driver.switch_to.new_window("tab")
        driver.get(url)
        _wait(driver, lambda d: _by(d, "body").get_attribute("data-ready") == "1")
        assert driver.execute_script("return sessionStorage.getItem('mech-vqa-session')") != session
        Select(_by(driver, "#item")).select_by_value("1")
        _by(driver, "#ask").click()
        _wait(driver, lambda d: idle(d) and d.find_elements("id", "answer-text"))
        assert _by(driver, ".mv-qa").text.startswith("Q: " + organism_eval_items[1]["question"])
        driver.close()
        driver.switch_to.window(first_tab)
        _by(driver, '.mv-token[data-index="0"]').click()  # computed by the server from this tab's state
        _drawn(driver, "0|mechanistic")
        assert _by(driver, ".mv-qa").text.startswith("Q: " + organism_eval_items[0]["question"])
        assert console_errors(driver) == [] or all("notes.txt" in e or "400" in e for e in console_errors(driver))

        # the exported view opens offline
        link = _by(driver, "#export-html").get_attribute("href")
        assert link.startswith(f"{url}api/export.html?session={session}&token=0")
        with urllib.request.urlopen(link, timeout=60) as response:
            exported = tmp_path / "exported.html"
            exported.write_bytes(response.read())
        console_errors(driver)
        _open_offline(driver, exported)
        shown = _drawn(driver, "0|mechanistic")
        _by(driver, '.mv-token[data-index="4"]').click()
        assert _drawn(driver, "4|mechanistic") != shown
        assert console_errors(driver) == [] and fetched(driver) == []
    finally:
        online(driver)
        server.shutdown()
        server.server_close()
        explorer.worker.shutdown(wait=True)
