"""The embed script in a real browser, on a page of another origin, called as upstream's embedding docs show:
Sage code with text and a plot, an `@interact` slider that recomputes, linked cells sharing a kernel, a
permalink that reopens the code, and the SockJS fallback of a browser without WebSockets.

Against a laptop server of their own, or with CELLFLEET_LAB_URL against a cluster (`make embed-lab`: the lab's
load balancer, TLS, two cells): the same page, the same assertions, with the patience an emulated cell needs."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from browser import Browser
from test_sessions import wait_for_status

from conftest import RemoteService, Service, lab_url, sage_python, serving_with_settings

SAGE_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>a course page</title>
<script src="{server}/embedded_sagecell.js"></script>
<script>
sagecell.makeSagecell({{inputLocation: "#plot", evalButtonText: "Evaluate"}});
sagecell.makeSagecell({{inputLocation: ".linked", linked: true}});
sagecell.makeSagecell({{inputLocation: "#interact", hide: ["permalink"]}});
</script></head><body>
<div id="plot"><script type="text/x-sage">print(factorial(10))
show(plot(sin(x), (x, 0, 3)))</script></div>
<div class="linked"><script type="text/x-sage">a = 2^10</script></div>
<div class="linked"><script type="text/x-sage">print(a + 1)</script></div>
<div id="interact"><script type="text/x-sage">@interact
def f(n=slider(1, 10, 1, default=2)):
    print("square", n^2)</script></div>
</body></html>
"""
LIFETIME_SECONDS = 5
# Seconds a cell may take to compute: a lab cell has one emulated vCPU, a plot takes it tens of seconds.
PATIENCE = 240 if lab_url() else 60
LINKED_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>a course page</title>
<script src="{server}/embedded_sagecell.js"></script>
</head><body>
<div id="cell">kept = 1</div>
<script>sagecell.makeSagecell({{inputLocation: "#cell", languages: ["python"], linked: true}});</script>
</body></html>
"""
NO_WEBSOCKET_PAGE = """<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>a course page</title>
<script>window.WebSocket = undefined;</script>
<script src="{server}/static/embedded_sagecell.js"></script>
</head><body>
<div id="cell">print(6 * 7)</div>
<script>sagecell.makeSagecell({{inputLocation: "#cell", languages: ["python"], autoeval: true}});</script>
</body></html>
"""


@pytest.fixture(scope="module")
def sage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service | RemoteService]:
    if lab_url():
        yield RemoteService(lab_url() or "")
        return
    settings = 'kernel = "sage"\nmax_kernels = 4\npreforked = 2\n'
    yield from serving_with_settings(tmp_path_factory.mktemp("embed-sage"), settings, python=sage_python())


@pytest.fixture(scope="module")
def python_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service | RemoteService]:
    """A Python-kernel server whose sessions live a few seconds at most; against a cluster, the cluster (whose
    Sage kernel runs the pages' Python as upstream's does)."""
    if lab_url():
        yield RemoteService(lab_url() or "")
        return
    settings = f"max_kernels = 2\npreforked = 1\nsession_lifetime_seconds = {LIFETIME_SECONDS}\n"
    yield from serving_with_settings(tmp_path_factory.mktemp("embed-python"), settings)


def cell(index: int) -> str:
    return f"sagecell.cells[{index}]"


def evaluate_and_wait(browser: Browser, index: int, timeout: float = PATIENCE) -> str:
    """Press the cell's Evaluate button; its output text once the cell is done (fails if it failed)."""
    browser.evaluate(f"{cell(index)}.evalButton.click()")
    state = browser.wait_for(f"['done', 'failed'].includes({cell(index)}.cell.dataset.state) && "
                             f"{cell(index)}.cell.dataset.state", timeout=timeout)  # fmt: skip
    output = browser.evaluate(f"{cell(index)}.output.textContent")
    assert state == "done", output
    return output


def open_page(browser: Browser, site: tuple[str, dict[str, str]], path: str, page: str, cells: int) -> None:
    origin, pages = site
    pages[path] = page
    browser.open(origin + path, ready=f"window.sagecell && sagecell.cells.length === {cells}")


def test_an_embedded_sage_cell_shows_text_and_a_plot(browser: Browser, site: tuple, sage: Service) -> None:
    open_page(browser, site, "/course.html", SAGE_PAGE.format(server=sage.url), cells=4)
    # The editor is CodeMirror, served by this server (no CDN), with the page's code in it.
    browser.wait_for(f"{cell(0)}.editor !== undefined")
    assert browser.evaluate(f"{cell(0)}.editor.getValue()").startswith("print(factorial(10))")
    assert browser.evaluate("document.querySelector('#plot .CodeMirror') !== null")
    assert evaluate_and_wait(browser, 0).startswith("3628800\n")
    image = browser.evaluate(f"{cell(0)}.output.querySelector('img') && {cell(0)}.output.querySelector('img').src")
    assert image and image.startswith("data:image/png;base64,iVBOR"), image
    assert browser.evaluate(f"{cell(0)}.output.querySelector('img').naturalWidth") > 100  # a picture, decoded


def test_linked_cells_share_their_kernel(browser: Browser, site: tuple, sage: Service) -> None:
    open_page(browser, site, "/course.html", SAGE_PAGE.format(server=sage.url), cells=4)
    browser.wait_for(f"{cell(2)}.editor !== undefined")
    assert evaluate_and_wait(browser, 1) == ""
    assert evaluate_and_wait(browser, 2) == "1025\n"  # a NameError in a kernel of its own


def test_an_interact_slider_recomputes_in_the_page(browser: Browser, site: tuple, sage: Service) -> None:
    open_page(browser, site, "/course.html", SAGE_PAGE.format(server=sage.url), cells=4)
    browser.wait_for(f"{cell(3)}.editor !== undefined")
    assert "square 4" in evaluate_and_wait(browser, 3)
    slider = f"{cell(3)}.output.querySelector('.sagecell_interact input[type=range]')"
    interact_output = f"{cell(3)}.output.querySelector('.sagecell_interactOutput').textContent"
    assert browser.evaluate(f"[{slider}.min, {slider}.max, {slider}.value]") == ["1", "10", "2"]
    browser.evaluate(f"(s => {{ s.value = '7'; s.dispatchEvent(new Event('change')); }})({slider})")
    browser.wait_for(f"{interact_output} === 'square 49\\n'", PATIENCE)
    browser.evaluate(f"(s => {{ s.value = '9'; s.dispatchEvent(new Event('change')); }})({slider})")
    browser.wait_for(f"{interact_output} === 'square 81\\n'", PATIENCE)
    # Run again: a new kernel, and the one the interact kept is freed, not left to its idle timeout.
    first = browser.evaluate(f"{cell(3)}.current.id")
    assert "square 4" in evaluate_and_wait(browser, 3)
    assert browser.evaluate(f"{cell(3)}.current.id") != first
    wait_for_status(sage, first, 404, patience=PATIENCE / 6)


def test_a_permalink_of_a_sage_cell_reopens_it(browser: Browser, site: tuple, sage: Service) -> None:
    open_page(browser, site, "/course.html", SAGE_PAGE.format(server=sage.url), cells=4)
    browser.wait_for(f"{cell(0)}.editor !== undefined")
    code = browser.evaluate(f"{cell(0)}.getCode()")
    evaluate_and_wait(browser, 0)
    link = browser.wait_for(f"{cell(0)}.permalink.querySelector('a.sagecell_permalink_zip')?.href")
    assert link.startswith(sage.url + "/?z=") and "lang=sage" in link, link
    browser.open(link)  # the server's own page, a cell of the same script
    assert browser.evaluate(f"{cell(0)}.getCode()") == code
    assert browser.evaluate(f"{cell(0)}.language") == "sage"


def test_without_websockets_the_cell_runs_over_sockjs(browser: Browser, site: tuple, python_server: Service) -> None:
    open_page(browser, site, "/no-websocket.html", NO_WEBSOCKET_PAGE.format(server=python_server.url), cells=1)
    browser.wait_for(f"{cell(0)}.cell.dataset.state === 'done'", timeout=PATIENCE)
    assert browser.evaluate(f"{cell(0)}.output.textContent") == "42\n"
    assert browser.evaluate("typeof window.SockJS") == "function"  # the fallback was what carried it


@pytest.mark.skipif(lab_url() is not None, reason="needs a server whose sessions live 5 s")
def test_a_session_the_server_ends_says_why_on_the_page(browser: Browser, site: tuple, python_server: Service) -> None:
    open_page(browser, site, "/linked.html", LINKED_PAGE.format(server=python_server.url), cells=1)
    assert evaluate_and_wait(browser, 0) == ""
    # A linked cell keeps its kernel for the next evaluation; the server's lifetime limit ends it.
    message = browser.wait_for(f"{cell(0)}.messages.textContent", timeout=4 * LIFETIME_SECONDS)
    assert "has ended (the lifetime limit (5 s))" in message, message
    assert evaluate_and_wait(browser, 0) == ""  # the next evaluation gets a new kernel


def test_the_embed_script_is_served_where_upstream_serves_it(python_server: Service) -> None:
    bodies = []
    for path in ("/embedded_sagecell.js", "/static/embedded_sagecell.js"):
        status, headers, body = python_server.request("GET", path)
        assert status == 200 and "javascript" in headers["Content-Type"], (path, status)
        bodies.append(body)
    assert bodies[0] == bodies[1] and "makeSagecell" in bodies[0]
    for path in ("/static/codemirror/codemirror.js", "/static/codemirror/python.js", "/static/sockjs.min.js"):
        assert python_server.request("GET", path)[0] == 200, path
