"""The cell page: upstream's link forms open the same code; in a real browser Run and Permalink work."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
from browser import Browser

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


def test_c_z_and_q_links_open_with_their_code_and_run_it(cells: Service) -> None:
    ident = make_permalink(cells, CODE)["query"]
    for query in (f"c={CODE}", f"z={zip_text(CODE).rstrip('=')}", f"q={ident}"):
        status, headers, page = cells.request("GET", "/?" + query.replace("#", "%23").replace(" ", "+"))
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        cell = initial_cell(page)
        # Upstream runs a linked cell on open.
        assert (cell["code"], cell["language"], cell["autoeval"]) == (CODE, "python", True), query
        # autoeval=false opens it without running it.
        stopped = initial_cell(
            cells.request("GET", "/?" + query.replace("#", "%23").replace(" ", "+") + "&autoeval=false")[2]
        )
        assert (stopped["code"], stopped["autoeval"]) == (CODE, False), query
    assert initial_cell(cells.request("GET", "/")[2])["autoeval"] is False  # nothing to run


def test_links_restore_their_language_and_interacts(cells: Service) -> None:
    interacts = '[{"state": {"n": 3}, "bookmarks": []}]'
    status, _headers, body = cells.request(
        "POST", "/permalink", {"code": "1", "language": "python", "interacts": interacts}
    )
    assert status == 200, body
    answer = json.loads(body)
    cell = initial_cell(cells.request("GET", f"/?z={answer['zip']}&lang=python&interacts={answer['interacts']}")[2])
    assert (cell["language"], cell["interacts"]) == ("python", interacts)
    cell = initial_cell(cells.request("GET", f"/?q={answer['query']}")[2])
    assert (cell["language"], cell["interacts"]) == ("python", interacts)
    # A language this server's kernel cannot run opens in the one it can (the Python kernel has no Sage).
    assert initial_cell(cells.request("GET", "/?c=1&lang=sage")[2])["language"] == "python"


def test_broken_links_answer_as_upstream(cells: Service) -> None:
    for query, expected, message in (
        ("z=notzlib", 400, "Invalid zipped code"),
        ("z=" + zip_text("1") + "&interacts=notzlib", 400, "Invalid zipped code"),
        ("q=zzzzzz", 404, "ID not found in permalink database"),
        ("q=../x", 404, "ID not found in permalink database"),  # any shape of id is looked up
        ("q=" + "a" * 500, 404, "ID not found in permalink database"),
    ):
        status, _headers, body = cells.request("GET", f"/?{query}")
        assert status == expected and message in json.loads(body)["error"], (query, body)


CELL = "sagecell.cells[0]"
STATE = f"{CELL}.cell.dataset.state"
OUTPUT = f"{CELL}.output.textContent"


def run_in_page(browser: Browser, code: str) -> str:
    """Put code in the page's editor, press Evaluate; the state the cell ends in."""
    browser.evaluate(f"{CELL}.setCode({json.dumps(code)})")
    browser.evaluate(f"{CELL}.evalButton.click()")
    return browser.wait_for(f"['done', 'failed'].includes({STATE}) && {STATE}")


def test_run_shows_the_output_in_the_browser(cells: Service, browser: Browser) -> None:
    browser.open(cells.url + "/")
    browser.wait_for(f"{CELL}.editor !== undefined")  # CodeMirror, from this server
    assert run_in_page(browser, "print(6 * 7)") == "done"
    assert browser.evaluate(OUTPUT) == "42\n"
    assert run_in_page(browser, "1/0") == "failed"
    assert "ZeroDivisionError" in browser.evaluate(OUTPUT)


def test_an_evaluation_makes_links_that_reopen_the_code(cells: Service, browser: Browser) -> None:
    code = "print('made in the browser')"
    browser.open(cells.url + "/")
    assert run_in_page(browser, code) == "done"
    links = browser.wait_for(
        f"(a => a.length === 2 && Array.from(a, link => link.href))({CELL}.permalink.querySelectorAll('a'))"
    )
    for link in links:
        browser.open(link)
        assert browser.evaluate(f"{CELL}.getCode()") == code, link


def test_a_link_runs_on_open_unless_autoeval_is_false(cells: Service, browser: Browser) -> None:
    browser.open(cells.url + f"/?z={zip_text('print(sum(range(10)))')}")
    browser.wait_for(f"{STATE} === 'done'")
    assert browser.evaluate(OUTPUT) == "45\n"
    browser.open(cells.url + "/?c=print(7)&autoeval=false")
    browser.wait_for(f"{CELL}.editor !== undefined")  # a run on open would have started by now
    assert browser.evaluate(f"{CELL}.getCode()") == "print(7)"
    assert browser.evaluate(f"{STATE} === undefined") and browser.evaluate(OUTPUT) == ""
    assert run_in_page(browser, "print(7)") == "done"
    assert browser.evaluate(OUTPUT) == "7\n"


def test_static_assets_are_served_with_versioned_urls(cells: Service) -> None:
    page = cells.request("GET", "/")[2]
    script = re.search(r'src="(/static/cellfleet\.js\?v=\w+)"', page)
    assert script, page
    status, headers, body = cells.request("GET", script.group(1))
    assert status == 200 and "makeSagecell" in body
    assert "max-age" in headers.get("Cache-Control", "")


def credentialed_post(url: str, fields: dict[str, str]) -> str:
    """Script for the page: a form POST with the user's credentials, as upstream's embed sends it; the answer's
    JSON, or what the browser refused."""
    return (f"fetch({json.dumps(url)}, {{method: 'POST', credentials: 'include', "
            f"body: new URLSearchParams({json.dumps(fields)})}})"
            ".then(r => r.json(), e => ({refused: String(e)}))")  # fmt: skip


def test_a_page_on_another_origin_calls_with_credentials(cells: Service, browser: Browser, site: tuple) -> None:
    origin, pages = site
    pages["/"] = "<!DOCTYPE html><title>a course page</title><p>embeds a cell</p>"
    browser.open(origin + "/", ready="document.title === 'a course page'")
    answer = browser.evaluate(credentialed_post(cells.url + "/service", {"code": "print(6 * 7)"}))
    assert answer.get("stdout") == "42\n", answer
    answer = browser.evaluate(credentialed_post(cells.url + "/permalink", {"code": "1", "n": "3"}))
    assert re.fullmatch(r"[a-z]{6}", answer.get("query", "")) and answer["n"] == 3, answer
