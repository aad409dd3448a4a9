"""The web page in a real browser: Debian's chromium, driven by Playwright, against a real `dlkit serve`
(the three shared runs: digits, table rows, texts) started with an API key, which the page asks for.
Each answer the page shows is checked against what the API answers for the same input."""
from __future__ import annotations

import base64
import os
import shutil
from collections.abc import Iterator

import httpx
import pytest

KEY = "page-test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
DIGITS, TABLE, TEXT = "digits-cnn", "breast-cancer-lstm", "tiny-text-lstm"


def chromium() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if os.access("/usr/bin/chromium", os.X_OK) else None)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.skip(f"playwright is not importable ({exc}); install dlkit's dev extra")
    path = chromium()
    if path is None:
        pytest.skip("no chromium (/usr/bin/chromium or on PATH); .ci/run installs Debian's package")
    with sync_playwright() as p:
        launched = p.chromium.launch(executable_path=path, headless=True)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(browser, request, serving, tmp_path_factory) -> Iterator[str]:
    """A real `dlkit serve` on a free loopback port, ready; stopped by PID afterwards. The runs are asked
    for only here, so a missing browser skips before any training."""
    runs = request.getfixturevalue("runs")
    folder = tmp_path_factory.mktemp("page-server")
    (folder / "key").write_text(KEY + "\n")
    args = [str(runs[DIGITS]), str(runs[TABLE]), str(runs[TEXT]), "--backend", "torch",
            "--api-key-file", str(folder / "key")]
    with serving(args, folder / "server.log") as (base, _):
        yield base


@pytest.fixture
def page(browser, server):
    """The page, opened fresh, with the API key entered; any script error or CSP refusal fails the test."""
    context = browser.new_context(viewport={"width": 1100, "height": 900})
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda exc: problems.append(str(exc)))
    # the browser logs each 4xx answer as an error; those the tests provoke are checked where they happen
    tab.on("console", lambda m: problems.append(m.text)
           if m.type == "error" and not m.text.startswith("Failed to load resource") else None)
    tab.goto(server)
    tab.wait_for_function("() => document.getElementById('alert').textContent.includes('API key')")  # 401 before the key
    assert tab.evaluate("document.getElementById('settings').open")  # the page opened the key field itself
    tab.fill("#key", KEY)
    tab.click("#use-key")
    tab.wait_for_function("() => document.getElementById('model').options.length === 3")
    assert tab.text_content("#alert") == ""
    yield tab
    context.close()
    assert problems == []


def api(server: str, name: str, route: str = "predict", **kwargs) -> httpx.Response:
    return httpx.post(f"{server}/v1/models/{name}/{route}", headers=AUTH, timeout=30, **kwargs)


def shown(page) -> tuple[str, dict[str, float]]:
    """The label and the bars' probabilities, once the prediction is on the page."""
    page.wait_for_selector("#bars li")
    bars = page.eval_on_selector_all("#bars li", "els => els.map(e => [e.dataset.label, Number(e.dataset.probability)])")
    return page.text_content("#label"), dict(bars)


def test_the_page_has_a_strict_content_security_policy(server):
    r = httpx.get(server)
    policy = r.headers["content-security-policy"]
    assert r.status_code == 200 and "<canvas" in r.text
    assert "default-src 'none'" in policy and "script-src 'sha256-" in policy and "unsafe-inline" not in policy


def test_a_drawn_digit_is_predicted_as_the_api_predicts_its_png_and_explained(page, server, tmp_path):
    page.select_option("#model", DIGITS)
    box = page.locator("#pad").bounding_box()
    x = box["x"] + box["width"] / 2  # a "1": one vertical stroke down the middle
    page.mouse.move(x, box["y"] + box["height"] * 0.15)
    page.mouse.down()
    page.mouse.move(x + 4, box["y"] + box["height"] * 0.85, steps=15)
    page.mouse.up()
    page.click("#predict")
    label, bars = shown(page)
    assert len(bars) == 10 and sum(bars.values()) == pytest.approx(1, abs=1e-4)
    assert label == max(bars, key=bars.get)
    widths = page.eval_on_selector_all("#bars .fill", "els => els.map(e => e.getBoundingClientRect().width)")
    assert widths[0] > 20 and widths == sorted(widths, reverse=True)  # the bars are drawn, longest first
    data = page.evaluate("document.getElementById('pad').toDataURL('image/png')")
    png = base64.b64decode(data.split(",", 1)[1])
    answer = api(server, DIGITS, files={"files": ("drawing.png", png, "image/png")}).json()["predictions"][0]
    assert label == answer["label"] and bars[label] == pytest.approx(answer["confidence"], abs=1e-6)
    page.wait_for_function("() => { const i = document.getElementById('cam'); "
                           "return !i.hidden && i.complete && i.naturalWidth > 100 }")
    assert page.get_attribute("#cam", "src").startswith("blob:")
    assert "ms on the server" in page.text_content("#took")
    shot = page.screenshot(path=tmp_path / "page.png", full_page=True)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n" and (tmp_path / "page.png").stat().st_size > 10_000


def test_an_uploaded_image_is_predicted(page, server, digit_files):
    page.select_option("#model", DIGITS)
    page.set_input_files("#file", str(digit_files[0]))  # choosing a file predicts it at once
    label, bars = shown(page)
    answer = api(server, DIGITS, files={"files": ("d.png", digit_files[0].read_bytes(), "image/png")}).json()
    assert label == answer["predictions"][0]["label"] and sum(bars.values()) == pytest.approx(1, abs=1e-4)
    page.wait_for_selector("#cam:not([hidden])")


def test_a_typed_sentence_is_predicted_and_its_words_coloured(page, server):
    sentence = "a wonderful film with a great story"
    page.select_option("#model", TEXT)
    page.fill("#words-in", sentence)
    page.click("#predict")
    label, _ = shown(page)
    assert label == api(server, TEXT, json={"inputs": [sentence]}).json()["predictions"][0]["label"]
    page.wait_for_selector("#words:not([hidden]) span")
    words = page.eval_on_selector_all("#words span", "els => els.map(e => [e.textContent, getComputedStyle(e).backgroundColor])")
    tokens = api(server, TEXT, "explain", json={"inputs": [sentence]}).json()["tokens"]
    assert [w for w, _ in words] == [t["token"] for t in tokens]
    assert any(colour not in ("rgba(0, 0, 0, 0)", "transparent") for _, colour in words)


def test_the_table_form_has_a_named_field_per_feature_and_predicts(page, server):
    from sklearn.datasets import load_breast_cancer

    features = httpx.get(f"{server}/v1/models", headers=AUTH).json()["models"][1]["input"]["features"]
    page.select_option("#model", TABLE)
    labels = page.eval_on_selector_all("#fields label", "els => els.map(e => [e.textContent, e.control.name])")
    assert len(labels) == 30 and labels == [[f, f] for f in features]
    row = load_breast_cancer().data[0]
    for i, value in enumerate(row):
        page.fill(f"#f{i}", repr(float(value)))
    page.click("#predict")
    label, bars = shown(page)
    answer = api(server, TABLE, json={"inputs": [dict(zip(features, map(float, row)))]}).json()["predictions"][0]
    assert label == answer["label"] and set(bars) == {"malignant", "benign"}


def test_a_bad_file_shows_the_apis_error_in_the_alert(page, server):
    junk = b"just some text, not a picture\n"
    page.select_option("#model", DIGITS)
    page.set_input_files("#file", files=[{"name": "notes.png", "mimeType": "image/png", "buffer": junk}])
    page.wait_for_function("() => document.getElementById('alert').textContent !== ''")
    error = api(server, DIGITS, files={"files": ("notes.png", junk, "image/png")}).json()["error"]
    assert page.text_content("#alert") == error and "notes.png" in error


def test_the_keyboard_alone_picks_a_model_types_and_predicts(page, server):
    page.evaluate("document.activeElement.blur()")
    for _ in range(8):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "model":
            break
    assert page.evaluate("document.activeElement.id") == "model"
    page.keyboard.press("ArrowDown")  # the text model, third in the list
    page.keyboard.press("ArrowDown")
    assert page.input_value("#model") == TEXT
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "words-in"
    page.keyboard.type("a dull and boring film")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "predict"
    assert page.evaluate("getComputedStyle(document.activeElement).outlineStyle") != "none"  # focus is visible
    page.keyboard.press("Enter")
    label, _ = shown(page)
    assert label == api(server, TEXT, json={"inputs": ["a dull and boring film"]}).json()["predictions"][0]["label"]
