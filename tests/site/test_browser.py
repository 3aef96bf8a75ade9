"""Both editions of the website in a real browser: Debian's Chromium driven by Playwright, served on
127.0.0.1. The main site is `make book`'s _build/html; the student edition is `make student-book`'s
_build/student/html (the same pages, built from the student notebooks).

On both, every page in the toc loads with no console error, sends no request off this machine,
shows every image, typesets its math, and links only to pages and anchors that exist. On the main
site the Colab buttons open the notebook in the repository named in _config.yml; the student
edition has none (they would open the solutions) and shows no solution. The preface's course map
has a box, linking to its page, for every chapter. Each page is visited once per site; the tests
read what that visit recorded.
"""

import functools
import http.server
import re
import shutil
import threading
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlparse

import pytest

from conftest import ROOT, cell_source, load_notebook, toc_files
from coursekit.course import chapters
from coursekit.student import BEGIN, student_branch

SITES = {"main": ROOT / "_build" / "html", "student": ROOT / "_build" / "student" / "html"}
MAKE = {"main": "make book", "student": "make student-book"}
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
NOTEBOOK_PAGES = [d for d in PAGES if (ROOT / f"{d}.ipynb").exists()]
CASES = [(site, doc) for site in SITES for doc in PAGES]
IDS = [f"{site}:{doc}" for site, doc in CASES]


class Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def servers():
    running, urls = [], {}
    for site, html in SITES.items():
        if (html / "index.html").exists():
            handler = functools.partial(Quiet, directory=str(html))
            httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=httpd.serve_forever, daemon=True).start()
            running.append(httpd)
            urls[site] = f"http://127.0.0.1:{httpd.server_address[1]}/"
    yield urls
    for httpd in running:
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


_SEEN = {}

_COLLECT = """() => ({
    title: document.title,
    images: [...document.images].map(i => [i.src, i.complete && i.naturalWidth > 0]),
    math: document.querySelectorAll('.math').length,
    typeset: document.querySelectorAll('mjx-container').length,
    hrefs: [...document.querySelectorAll('a[href]')].map(a => a.href),
    svgLinks: [...document.querySelectorAll('svg a')].map(a => a.getAttribute('xlink:href') || a.getAttribute('href')),
    ids: [...document.querySelectorAll('[id]')].map(e => e.id),
    text: document.body.innerText,
    icon: (document.querySelector('link[rel~="icon"]') || {}).href || null,
})"""


def observe(site, doc, servers, browser):
    """Load one page of one site once; return what it did and what it shows."""
    if (site, doc) in _SEEN:
        return _SEEN[site, doc]
    if site not in servers:
        pytest.fail(f"no built site in {SITES[site].relative_to(ROOT)}: run `{MAKE[site]}` first")
    url = servers[site] + doc + ".html"
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    seen = {"url": url, "console": [], "offsite": [], "pageerrors": [], "failed": []}

    def route(r):
        host = urlparse(r.request.url).hostname
        if r.request.url.startswith(("data:", "blob:")) or host == "127.0.0.1":
            r.continue_()
        else:
            seen["offsite"].append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("console", lambda m: seen["console"].append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: seen["pageerrors"].append(str(e)))
    page.on("response", lambda r: seen["failed"].append(f"{r.status} {r.url}") if r.status >= 400 else None)
    try:
        page.goto(url, wait_until="load")
        page.evaluate("() => (window.MathJax && MathJax.startup) ? MathJax.startup.promise : null")
        page.wait_for_load_state("networkidle")
        shot = ROOT / "_build" / "screenshots" / site / f"{doc.replace('/', '_')}.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=False)
        seen.update(page.evaluate(_COLLECT))
    finally:
        context.close()
    _SEEN[site, doc] = seen
    return seen


@pytest.mark.parametrize("site, doc", CASES, ids=IDS)
def test_page_loads_offline_with_no_console_error(site, doc, servers, browser):
    seen = observe(site, doc, servers, browser)
    assert seen["title"], "page has no title"
    assert not seen["console"], f"console errors: {seen['console']}"
    assert not seen["pageerrors"], f"page errors: {seen['pageerrors']}"
    assert not seen["offsite"], f"requests that leave 127.0.0.1: {seen['offsite']}"
    assert not seen["failed"], f"requests the server answered with an error: {seen['failed']}"
    # without an icon link, a browser asks for /favicon.ico, which the site does not have (404)
    assert seen["icon"], "no <link rel=icon> on the page"
    with urllib.request.urlopen(seen["icon"]) as icon:
        assert icon.status == 200 and icon.read(), seen["icon"]
    broken = [src for src, ok in seen["images"] if not ok]
    assert not broken, f"images that did not load: {broken}"
    if seen["math"]:
        assert seen["typeset"] >= seen["math"], f"{seen['math']} math elements but {seen['typeset']} typeset"


@pytest.mark.parametrize("site", SITES)
def test_chapter_pages_have_typeset_math(site, servers, browser):
    for doc in [d for d in PAGES if d.startswith("chapters/") and d.endswith("/index")]:
        assert observe(site, doc, servers, browser)["typeset"] > 0, f"{doc}: no typeset math"


@functools.cache
def ids_of(path):
    text = path.read_text(encoding="utf-8", errors="replace")
    return set(re.findall(r'\bid="([^"]+)"', text)) | set(re.findall(r'\bname="([^"]+)"', text))


@pytest.mark.parametrize("site, doc", CASES, ids=IDS)
def test_internal_links_and_anchors_resolve(site, doc, servers, browser):
    seen = observe(site, doc, servers, browser)
    html, server = SITES[site], servers[site]
    hrefs = seen["hrefs"] + [urljoin(seen["url"], link) for link in seen["svgLinks"] if link]
    broken = []
    for href in sorted(set(hrefs)):
        if not href.startswith(server):
            continue
        url, anchor = urldefrag(href)
        target = html / unquote(urlparse(url).path).lstrip("/")
        if target.is_dir():
            target = target / "index.html"
        if not target.exists():
            broken.append(f"{href}: no file {target.relative_to(html)}")
        elif anchor and target.suffix == ".html" and unquote(anchor) not in ids_of(target):
            broken.append(f"{href}: no anchor #{anchor}")
    assert not broken, "broken internal links:\n" + "\n".join(broken)


def colab_links(seen):
    return [h for h in seen["hrefs"] if "colab.research.google.com" in h]


# each edition's folder, and its branch from the one named in _config.yml
COLAB_EDITIONS = {"main": (ROOT / "_build" / "colab", str),
                  "student": (ROOT / "_build" / "colab-student", student_branch)}


@pytest.mark.parametrize("edition", COLAB_EDITIONS)
@pytest.mark.parametrize("doc", NOTEBOOK_PAGES)
def test_colab_button_opens_this_notebook_from_the_colab_edition(doc, edition, servers, browser, config):
    """Each edition's Colab button opens the notebook from its Colab edition's branch (named once in
    _config.yml; the student edition's adds "-student"), and `make colab` wrote that notebook."""
    folder, branch_of = COLAB_EDITIONS[edition]
    links = colab_links(observe(edition, doc, servers, browser))
    org_repo = urlparse(config["repository"]["url"]).path.strip("/")
    branch = branch_of(config["repository"]["branch"])
    assert branch not in ("main", "master"), "the buttons would open the MyST sources, not the Colab edition"
    expected = f"https://colab.research.google.com/github/{org_repo}/blob/{branch}/{doc}.ipynb"
    assert links, "no Colab launch button on a notebook page"
    pattern = r"https://colab\.research\.google\.com/github/[\w.-]+/[\w.-]+/blob/[\w./-]+\.ipynb"
    for link in links:
        assert re.fullmatch(pattern, link), link
        assert link == expected, f"{link} != {expected}"
    assert (folder / f"{doc}.ipynb").is_file(), f"the button opens {doc}.ipynb, which `make colab` did not write"


@pytest.mark.parametrize("doc", NOTEBOOK_PAGES)
def test_student_edition_shows_stubs_not_solutions(doc, servers, browser):
    seen = observe("student", doc, servers, browser)
    main = observe("main", doc, servers, browser)
    assert "(student edition)" in seen["title"]
    blocks = sum(cell_source(c).count(BEGIN) for c in load_notebook(ROOT / f"{doc}.ipynb")["cells"])
    assert "BEGIN SOLUTION" not in seen["text"]
    assert "Solution to" not in seen["text"], "a worked solution is still on the page"
    assert seen["text"].count("write your solution here") == blocks, "one stub per solution block"
    figures = [[src for src, _ in site["images"] if "/_images/" in src] for site in (seen, main)]
    assert len(figures[0]) == len(figures[1]), "the student edition lost or gained figures"


def test_course_map_has_every_chapter_and_links_to_it(servers, browser):
    seen = observe("main", "intro", servers, browser)
    for ch in chapters(ROOT):
        assert f"chapter-{ch.folder}" in seen["ids"], f"no box for chapter {ch.number} ({ch.folder})"
        assert f"{ch.pages[0]}.html" in seen["svgLinks"], f"the box of {ch.folder} does not link to its page"
    arrows = [i for i in seen["ids"] if i.startswith("builds-on-")]
    assert arrows, "the course map has no arrows"
