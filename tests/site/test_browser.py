"""Both editions of the website in a real browser: Debian's Chromium driven by Playwright, served on
127.0.0.1. The main site is `make book`'s _build/html; the student edition is `make student-book`'s
_build/student/html (the same pages, built from the student notebooks).

On both, every page in the toc loads with no console error, sends no request off this machine,
shows every image, typesets its math, and links only to pages and anchors that exist. On the main
site the Colab buttons open the notebook in the repository named in _config.yml; the student
edition has none (they would open the solutions) and shows no solution. The preface's course map
has a box, linking to its page, for every chapter. Each page is visited once per site; the tests
read what that visit recorded.

Accessibility: on every page of both editions, axe-core (the copy that the pinned
axe-playwright-python bundles, injected into the page; no download) runs its WCAG 2.0 and 2.1 level
A and AA rules, and any violation fails, naming the page, the rule and the elements.
"""

import contextlib
import functools
import http.server
import re
import shutil
import threading
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urldefrag, urljoin, urlparse

import pytest
from axe_playwright_python.base import AXE_SCRIPT

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
WCAG = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]  # axe-core's tags for WCAG 2.0/2.1, levels A and AA
_AXE = """(tags) => axe.run(document, {runOnly: {type: 'tag', values: tags}, resultTypes: ['violations']})
    .then(r => r.violations.map(v => ({id: v.id, help: v.help, targets: v.nodes.map(n => n.target.join(' '))})))"""


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
    alts: [...document.images].map(i => [i.getAttribute('src'), i.getAttribute('alt')]),
    svgs: [...document.querySelectorAll('svg[role="img"]:not([aria-hidden="true"])')].map(s =>
        s.getAttribute('aria-label') || (s.querySelector('title') || {}).textContent
        || (document.getElementById(s.getAttribute('aria-labelledby')) || {}).textContent || ''),
})"""


def axe_violations(page):
    """Run axe-core's WCAG 2.1 A/AA rules on the loaded page; return its violations (id, help, targets)."""
    page.evaluate(AXE_SCRIPT)
    return page.evaluate(_AXE, WCAG)


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
    # What axe does once the page is recorded is not the page's: its CSSOM preload resolves the
    # theme's `@import "../basic.css"` against the site's root and asks for a /basic.css that no
    # page links. So the logs stop at `seen["done"]`.
    seen["done"] = False
    page.on("console", lambda m: seen["console"].append(m.text) if m.type == "error" and not seen["done"] else None)
    page.on("pageerror", lambda e: None if seen["done"] else seen["pageerrors"].append(str(e)))
    page.on("response", lambda r: seen["failed"].append(f"{r.status} {r.url}")
            if r.status >= 400 and not seen["done"] else None)
    try:
        page.goto(url, wait_until="load")
        page.evaluate("() => (window.MathJax && MathJax.startup) ? MathJax.startup.promise : null")
        page.wait_for_load_state("networkidle")
        shot = ROOT / "_build" / "screenshots" / site / f"{doc.replace('/', '_')}.png"
        shot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(shot), full_page=False)
        seen.update(page.evaluate(_COLLECT))
        seen["done"] = True
        seen["axe"] = axe_violations(page)
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


@pytest.mark.parametrize("site, doc", CASES, ids=IDS)
def test_every_image_has_a_text_alternative(site, doc, servers, browser):
    """axe accepts any alt; a file name read aloud tells a reader nothing, so it counts as none."""
    seen = observe(site, doc, servers, browser)
    bare = [src for src, alt in seen["alts"] if not (alt or "").strip() or alt.strip() == src
            or re.search(r"_images/|\.(png|svg|jpe?g|gif)$", alt.strip(), re.IGNORECASE)]
    assert not bare, f"{site}:{doc}: images whose alt text is missing or a file name: {bare}"
    assert all(label.strip() for label in seen["svgs"]), f"{site}:{doc}: an SVG image without a name"


@pytest.mark.parametrize("site, doc", CASES, ids=IDS)
def test_page_meets_wcag_21_aa_by_axe(site, doc, servers, browser):
    seen = observe(site, doc, servers, browser)
    found = [f"{v['id']} ({v['help']}): {'; '.join(v['targets'][:5])}" for v in seen["axe"]]
    assert not found, f"{site}:{doc} breaks axe-core's WCAG 2.1 A/AA rules:\n" + "\n".join(found)


def test_axe_finds_what_it_should(browser):
    """The accessibility check can fail: an image with no text alternative, a nameless button and
    light grey text are each reported."""
    page = browser.new_page()
    try:
        page.set_content(
            '<html lang="en"><head><title>t</title></head><body><main><h1>t</h1><img src="data:,">'
            '<button></button><p style="color:#bbb;background:#fff">faint</p></main></body></html>'
        )
        rules = {v["id"] for v in axe_violations(page)}
    finally:
        page.close()
    assert {"image-alt", "button-name", "color-contrast"} <= rules, rules


# Keyboard: the controls a reader can see (links, buttons, disclosure toggles, fields) are marked,
# then the test presses Tab until every one has had the focus, noting any whose focus shows no
# outline or shadow (on itself or inside it: the sidebar's toggles outline their chevron).
_CONTROLS = """() => {
    const els = [...document.querySelectorAll('a[href], button, summary, input, select, textarea, [tabindex]')]
        .filter(e => !e.disabled && e.getAttribute('tabindex') !== '-1' && !e.closest('[inert]')
                 && e.checkVisibility({checkOpacity: true, checkVisibilityCSS: true}));
    els.forEach((e, i) => { e.dataset.kb = i; });
    return els.map(e => e.tagName.toLowerCase() + ' '
                        + (e.getAttribute('aria-label') || e.textContent.trim().slice(0, 40)));
}"""
_FOCUSED = """() => {
    const e = document.activeElement;
    if (!e || e === document.body || e.dataset.kb === undefined) return null;
    const shows = x => { const c = getComputedStyle(x);
        return (c.outlineStyle !== 'none' && parseFloat(c.outlineWidth) > 0) || c.boxShadow !== 'none'; };
    return [Number(e.dataset.kb), shows(e) || [...e.querySelectorAll('*')].some(shows)];
}"""
KEYBOARD_PAGES = ["chapters/beyond/index", "chapters/beyond/lab_diagnostics"]


@contextlib.contextmanager
def opened(browser, url, width=1280, idle=True):
    """A page of the given width at url, loaded (and with the network idle, unless idle=False), closed afterwards."""
    page = browser.new_page(viewport={"width": width, "height": 900})
    try:
        page.goto(url, wait_until="load")
        if idle:
            page.wait_for_load_state("networkidle")
        yield page
    finally:
        page.close()


@pytest.mark.parametrize("doc", KEYBOARD_PAGES)
def test_keyboard_reaches_every_control_with_a_visible_focus(doc, servers, browser):
    with opened(browser, servers["main"] + doc + ".html") as page:
        controls = page.evaluate(_CONTROLS)
        reached, unseen = set(), set()
        for _ in range(2 * len(controls) + 20):
            page.keyboard.press("Tab")
            focused = page.evaluate(_FOCUSED)
            if focused is not None:
                reached.add(focused[0])
                if not focused[1]:
                    unseen.add(focused[0])
    assert len(controls) > 50, f"{doc}: only {len(controls)} controls found"
    missing = [controls[i] for i in range(len(controls)) if i not in reached]
    assert not missing, f"{doc}: Tab never reaches {missing}"
    assert not unseen, f"{doc}: no visible focus on {[controls[i] for i in sorted(unseen)]}"


@pytest.mark.parametrize("doc", KEYBOARD_PAGES)
def test_keyboard_opens_a_solution_the_sidebar_and_the_launch_menu(doc, servers, browser):
    with opened(browser, servers["main"] + doc + ".html") as page:
        # a solution (sphinx-togglebutton): Enter on its toggle shows the hidden body
        toggle = page.locator(".solution button.toggle-button").first
        body = page.locator(".solution").first.locator("section, p").last
        assert not body.is_visible()
        toggle.focus()
        page.keyboard.press("Enter")
        page.wait_for_timeout(300)
        assert body.is_visible(), "Enter on a solution's toggle does not open it"
        # the sidebar: Enter on a chapter's fold toggle opens its list of pages
        # (a handle, not a locator: once open, the locator would find the next closed one)
        summary = page.locator(".bd-sidenav details:not([open]) > summary").first.element_handle()
        summary.focus()
        page.keyboard.press("Enter")
        page.wait_for_timeout(100)
        assert summary.evaluate("s => s.parentElement.open"), "Enter on a sidebar toggle does not unfold it"
        if page.locator(".dropdown-launch-buttons").count():  # a lab page: the launch menu opens by keyboard
            launch = page.locator(".dropdown-launch-buttons button.dropdown-toggle")
            launch.focus()
            page.keyboard.press("Enter")
            page.wait_for_timeout(300)
            assert page.locator(".dropdown-launch-buttons .dropdown-menu a").first.is_visible()


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


# Every label's rendered size: its font size in the SVG's user units times the units' scale on screen.
_MAP_FONT_PX = """() => Array.from(document.querySelectorAll('.course-map-svg svg text'))
    .map(t => parseFloat(getComputedStyle(t).fontSize) * t.getScreenCTM().a)"""


@pytest.mark.parametrize("width", [1280, 390])
def test_course_map_labels_render_at_12_px_at_least(width, servers, browser):
    """At a desktop and a phone width the map's labels stay readable (it scrolls sideways instead)."""
    with opened(browser, servers["main"] + "intro.html", width=width, idle=False) as page:
        sizes = page.evaluate(_MAP_FONT_PX)
    assert len(sizes) > len(chapters(ROOT)), f"found {len(sizes)} labels in the course map"
    assert min(sizes) >= 11.9, f"the smallest course-map label renders at {min(sizes):.1f} px (at least 12 px)"


_FIGURE_WIDTHS = """() => Array.from(document.querySelectorAll('.cell_output img'))
    .map(i => [i.getBoundingClientRect().width, i.naturalWidth])"""


def test_the_text_column_is_as_wide_as_the_figure_audit_assumes(servers, browser):
    """normlab.runtime.plotting.audit judges figures' text at COLUMN_PX wide: a figure that wide or wider
    must render at least that wide in a 1280 px window, or the audit passes text that the page shrinks."""
    from normlab.runtime.plotting import COLUMN_PX

    with opened(browser, servers["main"] + "chapters/scratch/lab.html", idle=False) as page:
        widths = page.evaluate(_FIGURE_WIDTHS)
    assert widths, "no figure in the scratch lab's outputs"
    narrow = [(round(shown), natural) for shown, natural in widths if shown < min(natural, COLUMN_PX) - 1]
    assert not narrow, f"figures shown narrower than the audit assumes ({COLUMN_PX} px): {narrow}"
