"""Sphinx extension: emit each inline <script> once per page.

With Jupyter Book 1.0.4 (Sphinx 7.4), the inline scripts that sphinx-thebe and sphinx-togglebutton
add (e.g. ``const THEBE_JS_URL = ...``) land twice in every page's <head>: Sphinx keeps one copy
with filename ``None`` (added to the builder) and one with ``''`` (from its registry), and its
de-duplication tells the two apart. The second ``const`` declaration is a SyntaxError that the
browser reports on every page. Dropping the duplicates fixes the page itself; the browser test
still fails on any console error.
"""


def _drop_duplicate_scripts(app, pagename, templatename, context, doctree):
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        filename = getattr(script, "filename", script) or ""  # None and "" both mean inline
        key = (filename, repr(getattr(script, "attributes", "")))
        if key not in seen:
            seen.add(key)
            unique.append(script)
    scripts[:] = unique


def setup(app):
    app.connect("html-page-context", _drop_duplicate_scripts, priority=900)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
