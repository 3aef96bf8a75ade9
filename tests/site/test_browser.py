"""The built website in a real browser: Debian's Chromium driven by Playwright, served on 127.0.0.1.

Every page in the toc loads with no console error, sends no request off this machine, shows every
image, typesets its math, links only to pages and anchors that exist, and its Colab buttons point
at the notebook in the repository named in _config.yml. Needs `make book` first.
"""

import functools
import http.server
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import unquote, urldefrag, urlparse

import pytest

from conftest import ROOT, toc_files

HTML = ROOT / "_build" / "html"
CHROMIUM = "/usr/bin/chromium"
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


PAGES = toc_files()


@pytest.fixture(scope="module")
def server():
    if not (HTML / "index.html").exists():
        pytest.fail("no built site in _build/html: run `make book` first")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(HTML))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists() and not shutil.which("chromium"):
        pytest.fail(
            "Chromium is missing: install Debian's package with "
            "`apt-get update && apt-get install -y chromium` (never a downloaded browser), then rerun."
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


def visit(browser, url, shot=None):
    """Load url; return what the page did: console errors, off-machine requests, and a live page."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    record = {"console": [], "offsite": [], "pageerrors": []}

    def route(r):
        host = urlparse(r.request.url).hostname
        if r.request.url.startswith(("data:", "blob:")) or host == "127.0.0.1":
            r.continue_()
        else:
            record["offsite"].append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("console", lambda m: record["console"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: record["pageerrors"].append(str(e)))
    page.goto(url, wait_until="load")
    page.evaluate("() => (window.MathJax && MathJax.startup) ? MathJax.startup.promise : null")
    page.wait_for_load_state("networkidle")
    if shot:
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=False)
    return page, context, record


@pytest.mark.parametrize("doc", PAGES)
def test_page_loads_offline_with_no_console_error(doc, server, browser):
    shot = ROOT / "_build" / "screenshots" / f"{doc.replace('/', '_')}.png"
    page, context, record = visit(browser, server + doc + ".html", shot)
    try:
        assert page.title(), "page has no title"
        assert not record["console"], f"console errors: {record['console']}"
        assert not record["pageerrors"], f"page errors: {record['pageerrors']}"
        assert not record["offsite"], f"requests that leave 127.0.0.1: {record['offsite']}"
        images = page.evaluate("() => [...document.images].map(i => [i.src, i.complete && i.naturalWidth > 0])")
        broken = [src for src, ok in images if not ok]
        assert not broken, f"images that did not load: {broken}"
        math = page.locator(".math").count()
        typeset = page.locator("mjx-container").count()
        if math:
            assert typeset >= math, f"{math} math elements but {typeset} typeset by MathJax"
    finally:
        context.close()


def test_chapter_pages_have_typeset_math(server, browser):
    for doc in [d for d in PAGES if d.startswith("chapters/") and d.endswith("/index")]:
        page, context, _ = visit(browser, server + doc + ".html")
        n = page.locator("mjx-container").count()
        context.close()
        assert n > 0, f"{doc}: no typeset math"


@functools.cache
def ids_of(path):
    text = path.read_text(encoding="utf-8", errors="replace")
    return set(re.findall(r'\bid="([^"]+)"', text)) | set(re.findall(r'\bname="([^"]+)"', text))


@pytest.mark.parametrize("doc", PAGES)
def test_internal_links_and_anchors_resolve(doc, server, browser):
    page, context, _ = visit(browser, server + doc + ".html")
    hrefs = page.evaluate("() => [...document.querySelectorAll('a[href]')].map(a => a.href)")
    context.close()
    broken = []
    for href in sorted(set(hrefs)):
        if not href.startswith(server):
            continue
        url, anchor = urldefrag(href)
        target = HTML / unquote(urlparse(url).path).lstrip("/")
        if target.is_dir():
            target = target / "index.html"
        if not target.exists():
            broken.append(f"{href}: no file {target.relative_to(HTML)}")
        elif anchor and target.suffix == ".html" and unquote(anchor) not in ids_of(target):
            broken.append(f"{href}: no anchor #{anchor}")
    assert not broken, "broken internal links:\n" + "\n".join(broken)


NOTEBOOK_PAGES = [d for d in PAGES if (ROOT / f"{d}.ipynb").exists()]


@pytest.mark.parametrize("doc", NOTEBOOK_PAGES)
def test_colab_button_opens_this_notebook_from_the_repository(doc, server, browser, config):
    page, context, _ = visit(browser, server + doc + ".html")
    selector = 'a[href*="colab.research.google.com"]'
    links = page.evaluate("s => [...document.querySelectorAll(s)].map(a => a.href)", selector)
    context.close()
    org_repo = urlparse(config["repository"]["url"]).path.strip("/")
    expected = f"https://colab.research.google.com/github/{org_repo}/blob/{config['repository']['branch']}/{doc}.ipynb"
    assert links, "no Colab launch button on a notebook page"
    pattern = r"https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/[\w./-]+\.ipynb"
    for link in links:
        assert re.fullmatch(pattern, link), link
        assert link == expected, f"{link} != {expected}"
