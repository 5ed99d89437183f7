"""The cell page: upstream's link forms open the same code; in a real browser Run and Permalink work."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator

import pytest
from browser import Browser, chromium_binary

from cellserver.permalinks import zip_text
from conftest import Service, compute_server

CODE = "print(6 * 7)  # </script><b>not markup</b>"
INITIAL_CELL = re.compile(r'<script id="initial-cell" type="application/json">(.*?)</script>', re.S)


def initial_cell(page: str) -> dict:
    found = INITIAL_CELL.search(page)
    assert found, page
    return json.loads(found.group(1))


@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A compute server keeping its own permalinks (no permalink service): the laptop setup."""
    running = compute_server(tmp_path_factory.mktemp("page"), "--max-kernels", "3", "--preforked", "1")
    running.start()
    yield running
    running.stop()


def make_permalink(cells: Service, code: str) -> dict:
    status, _headers, body = cells.request("POST", "/permalink", {"code": code, "language": "python"})
    assert status == 200, body
    return json.loads(body)


def test_c_z_and_q_links_open_with_their_code(cells: Service) -> None:
    ident = make_permalink(cells, CODE)["query"]
    for query in (f"c={CODE}", f"z={zip_text(CODE).rstrip('=')}", f"q={ident}"):
        status, headers, page = cells.request("GET", "/?" + query.replace("#", "%23").replace(" ", "+"))
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        cell = initial_cell(page)
        assert cell == {"code": CODE, "autoeval": False, "error": ""}, query
    assert initial_cell(cells.request("GET", f"/?q={ident}&autoeval")[2])["autoeval"] is True


def test_broken_links_open_an_empty_cell_that_says_why(cells: Service) -> None:
    for query, message in (("z=notzlib", "damaged"), ("q=zzzzzz", "no permalink zzzzzz"), ("q=../x", "not a")):
        status, _headers, page = cells.request("GET", f"/?{query}")
        assert status == 200
        cell = initial_cell(page)
        assert cell["code"] == "" and message in cell["error"], (query, cell)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    binary = chromium_binary()
    if binary is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (apt install chromium); CI must run the browser tests")
        pytest.skip("chromium is not installed (apt install chromium)")
    running = Browser(binary)
    yield running
    running.close()


OUTPUT = "document.getElementById('output').textContent"
STATUS = "document.getElementById('status').textContent"


def test_run_shows_the_output_in_the_browser(cells: Service, browser: Browser) -> None:
    browser.open(cells.url + "/")
    browser.evaluate("document.getElementById('code').value = 'print(6 * 7)'")
    browser.evaluate("document.getElementById('run').click()")
    browser.wait_for(f"{STATUS} === 'done'")
    assert browser.evaluate(OUTPUT) == "42\n"
    browser.evaluate("document.getElementById('code').value = '1/0'")
    browser.evaluate("document.getElementById('run').click()")
    browser.wait_for(f"{STATUS} === 'failed'")
    assert "ZeroDivisionError" in browser.evaluate(OUTPUT)


def test_permalink_button_makes_links_that_reopen_the_code(cells: Service, browser: Browser) -> None:
    code = "print('made in the browser')"
    browser.open(cells.url + "/")
    browser.evaluate(f"document.getElementById('code').value = {json.dumps(code)}")
    browser.evaluate("document.getElementById('permalink').click()")
    browser.wait_for(f"{STATUS} === 'permalink ready'")
    for link in ("query-link", "zip-link"):
        browser.open(browser.evaluate(f"document.getElementById('{link}').href"))
        assert browser.evaluate("document.getElementById('code').value") == code, link


def test_an_autoeval_link_runs_on_open(cells: Service, browser: Browser) -> None:
    browser.open(cells.url + f"/?z={zip_text('print(sum(range(10)))')}&autoeval")
    browser.wait_for(f"{STATUS} === 'done'")
    assert browser.evaluate(OUTPUT) == "45\n"


def test_static_assets_are_served_with_versioned_urls(cells: Service) -> None:
    page = cells.request("GET", "/")[2]
    script = re.search(r'src="(/static/cellfleet\.js\?v=\w+)"', page)
    assert script, page
    status, headers, body = cells.request("GET", script.group(1))
    assert status == 200 and "addEventListener" in body
    assert "max-age" in headers.get("Cache-Control", "")
