"""The calculator page in headless Chromium: its numbers equal memory.py's, bad input shows a message.

Needs Debian's chromium and the playwright package: scripts/install-browser.sh installs both.
The browser runs with background networking off, and the test fails if the page asks the network.
"""

from __future__ import annotations

import shutil
import threading

import pytest

from hybridlm.calculator import WEB_DIR, make_server
from hybridlm.config import HybridConfig
from hybridlm.memory import attention_twin, cache_bytes, crossover_context
from hybridlm.presets import PRESETS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
CONTEXTS = (1, 65, 4096, 262144)
ROWS_JS = """() => [...document.querySelectorAll('#results tr')].map(tr =>
    [tr.dataset.model, ...[...tr.querySelectorAll('td[data-bytes]')].map(td => Number(td.dataset.bytes))])"""


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is missing: run scripts/install-browser.sh")
    if not shutil.which(CHROMIUM):
        pytest.fail("chromium is missing: run scripts/install-browser.sh")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _open(browser, url):
    page = browser.new_page()
    problems = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("request", lambda r: problems.append(f"network: {r.url}")
            if not r.url.startswith(("file://", "http://127.0.0.1")) else None)
    page.goto(url)
    page.wait_for_selector("#results tr")
    return page, problems


@pytest.fixture(scope="module")
def page(browser):
    page, problems = _open(browser, (WEB_DIR / "index.html").as_uri())
    yield page
    assert not problems, problems
    page.close()


def _custom(cfg: HybridConfig, pattern: str, ratio: int | None = None) -> HybridConfig:
    """What the page builds from the inputs a preset fills in (pure attention / r:1 G+A hybrid)."""
    return HybridConfig(num_layers=cfg.num_layers, layer_pattern=pattern, num_attention_heads=cfg.num_key_value_heads,
                        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
                        linear_num_key_heads=cfg.linear_num_key_heads,
                        linear_num_value_heads=cfg.linear_num_value_heads,
                        linear_key_head_dim=cfg.linear_key_head_dim, linear_value_head_dim=cfg.linear_value_head_dim,
                        linear_conv_kernel_dim=cfg.linear_conv_kernel_dim, state_dtype=cfg.state_dtype)


def _expected(cfg, batch, context, kv_dtype, ratio):
    models = [_custom(cfg, "A"), _custom(cfg, "G" * ratio + "A"), cfg, attention_twin(cfg)]
    out = []
    for m in models:
        b = cache_bytes(m, batch, context, kv_dtype)
        out.append([b.kv_bytes, b.state_bytes, b.total_bytes])
    return out


@pytest.mark.parametrize("kv_dtype", ["bfloat16", "float32"])
def test_page_numbers_equal_memory_py_for_every_preset(page, kv_dtype):
    page.select_option("#kv_dtype", kv_dtype)
    for i, name in enumerate(PRESETS):
        cfg = HybridConfig.preset(name)
        page.select_option("#preset", name)
        ratio = int(page.input_value("#ratio"))
        for j, context in enumerate(CONTEXTS):
            batch = 1 + (i + j) % 3
            page.fill("#batch", str(batch))
            page.fill("#context", str(context))
            rows = page.evaluate(ROWS_JS)
            assert [r[1:] for r in rows] == _expected(cfg, batch, context, kv_dtype, ratio), (name, context, batch)
            assert rows[2][0] == name
        cross = crossover_context(cfg, attention_twin(cfg), kv_dtype)
        assert page.get_attribute("#summary", "data-crossover") == ("none" if cross is None else str(cross)), name


def test_typed_dimensions_follow_memory_py(page):
    page.select_option("#preset", "llama-3.1-8b")
    page.select_option("#kv_dtype", "bfloat16")
    for field, value in (("context", "100000"), ("batch", "4"), ("ratio", "7"), ("kv_heads", "4"),
                         ("linear_value_heads", "12"), ("linear_key_heads", "6"), ("conv_kernel", "0")):
        page.fill(f"#{field}", value)
    page.select_option("#state_dtype", "bfloat16")
    rows = page.evaluate(ROWS_JS)
    cfg = HybridConfig.preset("llama-3.1-8b").replace(num_key_value_heads=4, linear_num_value_heads=12,
                                                      linear_num_key_heads=6, linear_conv_kernel_dim=0,
                                                      state_dtype="bfloat16")
    hybrid = _custom(cfg, "GGGGGGGA")
    assert rows[1][0] == "7:1 hybrid"
    b = cache_bytes(hybrid, 4, 100000, "bfloat16")
    assert rows[1][1:] == [b.kv_bytes, b.state_bytes, b.total_bytes]
    assert rows[0][1:][2] == cache_bytes(_custom(cfg, "A"), 4, 100000, "bfloat16").total_bytes


@pytest.mark.parametrize("field,value,good", [
    ("context", "-1", "4096"), ("context", "0", "1"), ("context", "abc", "4096"), ("context", "", "65"),
    ("context", "2.5", "3"), ("context", "NaN", "4096"), ("context", "1e12", "1000000"),
    ("context", "Infinity", "4096"), ("batch", "0", "2"), ("head_dim", "999999", "128"), ("layers", "-4", "48"),
    ("ratio", "x", "3"), ("linear_value_heads", "17", "32"),
])
def test_bad_input_shows_a_message_not_nan(page, field, value, good):
    page.reload()
    page.wait_for_selector("#results tr")
    page.fill(f"#{field}", value)
    assert page.is_visible("#error")
    message = page.inner_text("#error")
    assert field.replace("_", " ") in message, message
    assert page.evaluate(ROWS_JS) == []
    body = page.inner_text("body")
    assert "NaN" not in body.replace(value, "") and "Infinity" not in body.replace(value, "")
    page.fill(f"#{field}", good)  # a good value clears the message and brings the numbers back
    assert not page.is_visible("#error") and len(page.evaluate(ROWS_JS)) == 4


def test_served_by_hybridlm_calculator(browser):
    server = make_server(0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        page, problems = _open(browser, f"http://127.0.0.1:{server.server_address[1]}/")
        assert "74.7% less cache than its all-attention twin" in page.inner_text("#summary")
        assert page.evaluate("document.getElementById('chart').getContext('2d')"
                             ".getImageData(0, 0, 900, 360).data.some(v => v !== 0)")
        page.close()
        assert not problems, problems
    finally:
        server.shutdown()
        server.server_close()
