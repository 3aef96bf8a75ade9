"""Sphinx extension: pages about the course as a whole, generated when the book is built.

- ``course-map`` (directive; its content is the caption): the course map of the preface, drawn by
  :func:`coursekit.course.course_map_svg` from ``_toc.yml`` and the chapters' cross-references, as
  inline SVG, so each box links to its chapter.
- ``notebook-times`` (directive): a table of every notebook's measured execution time, from
  ``timings/quick.json`` and, where recorded, ``timings/full.json`` (``python -m coursekit.course
  timings`` writes them), with the machine and date of each.
- ``nbtime`` (role): the recorded quick-scale time of the notebooks named, summed, e.g.
  ``{nbtime}`chapters/scratch/lab chapters/pytorch/lab```. An unknown notebook or one with no
  recorded time is a build error, so no time on the page is typed by hand.
- Every link to an exercise reads "Exercise N (title)", the title taken from the exercise's
  directive (:func:`coursekit.course.exercise_titles`); sphinx-exercise alone writes "Exercise N".
"""

import json
import math
import re

from docutils import nodes
from sphinx.util.docutils import SphinxDirective


def _timings(env, scale):
    from coursekit.course import load_timings

    env.note_dependency(str(env.srcdir / "timings" / f"{scale}.json"))
    return load_timings(env.srcdir, scale)


def _hours(minutes):
    return f"{minutes} min" if minutes < 90 else f"{minutes / 60:.1f} h"


def _duration(seconds):
    return f"{seconds:.0f} s" if seconds < 100 else f"{seconds / 60:.1f} min"


class CourseMap(SphinxDirective):
    has_content = True

    def run(self):
        from coursekit.course import chapters, course_map_svg

        root = self.env.srcdir
        self.env.note_dependency(str(root / "_toc.yml"))
        for ch in chapters(root):  # redraw when a chapter's links or title change
            self.env.note_dependency(str(root / f"{ch.pages[0]}.md"))
        svg = course_map_svg(root)
        # The SVG's user unit is matplotlib's point, and its labels are 12 units: drawn narrower than
        # its own width in CSS pixels they fall below 12 px (about 8 px in the text column). So the
        # map never shrinks below that width; a narrower column scrolls it sideways instead.
        width = float(re.search(r'<svg[^>]*\bwidth="([\d.]+)pt"', svg).group(1))
        svg = svg.replace(
            "<svg ",
            f'<svg style="max-width: 100%; min-width: {math.ceil(width)}px; height: auto" role="img" '
            'aria-label="The course map: chapters by part, arrows from a chapter to those that build on it" ',
            1,
        )
        figure = nodes.container(classes=["course-map"])
        # a region that may scroll sideways must be reachable by keyboard (axe: scrollable-region-focusable)
        figure += nodes.raw("", '<div class="course-map-svg" tabindex="0" role="region" '
                            f'aria-label="Course map, scrolls sideways on a narrow screen">{svg}</div>', format="html")
        if self.content:
            caption = nodes.container(classes=["caption"])
            self.state.nested_parse(self.content, self.content_offset, caption)
            figure += caption
        return [figure]


def _table(header, rows, widths):
    table = nodes.table(classes=["notebook-times"])
    group = nodes.tgroup(cols=len(header))
    table += group
    group.extend(nodes.colspec(colwidth=w) for w in widths)
    for part, content in (("thead", [header]), ("tbody", rows)):
        section = nodes.thead() if part == "thead" else nodes.tbody()
        for cells in content:
            row = nodes.row()
            for cell in cells:
                entry = nodes.entry()
                entry += cell if isinstance(cell, nodes.Node) else nodes.paragraph(text=str(cell))
                row += entry
            section += row
        group += section
    return table


class NotebookTimes(SphinxDirective):
    def run(self):
        from coursekit.course import STUDENT_MINUTES, chapters, student_minutes

        quick, full = _timings(self.env, "quick"), _timings(self.env, "full")
        if quick is None:
            raise self.error("no timings/quick.json: run `python -m coursekit.course timings` and commit it")
        rows, total, student = [], {"quick": 0.0, "full": 0.0}, 0
        for ch in chapters(self.env.srcdir):
            for page in ch.pages[1:]:
                path = f"{page}.ipynb"
                if path not in quick["seconds"]:
                    raise self.error(f"{path} has no recorded time in timings/quick.json: rerun the timings")
                q = quick["seconds"][path]
                self.env.note_dependency(str(self.env.srcdir / path))
                est = student_minutes(json.loads((self.env.srcdir / path).read_text(encoding="utf-8")))
                student += est["total"]
                n = est["exercises"]
                est_text = (f"{_hours(est['total'])} ({est['reading']} min reading; {n['code']} code, "
                            f"{n['integration']} integration, {n['by hand']} by hand)")
                f = (full or {"seconds": {}})["seconds"].get(path)
                total["quick"] += q
                total["full"] += f or 0.0
                link = nodes.paragraph()
                link += nodes.reference("", page.split("/", 1)[1], refuri=self.env.app.builder.get_relative_uri(
                    self.env.docname, page))
                rows.append([str(ch.number), link, _duration(q), _duration(f) if f else "not recorded", est_text])
        rows.append(["", "all notebooks", _duration(total["quick"]),
                     _duration(total["full"]) if full else "not recorded", _hours(student)])
        table = _table(["chapter", "notebook", "run, quick", "run, full", "student time (estimate)"], rows,
                       [8, 30, 10, 12, 30])
        m = STUDENT_MINUTES
        notes = [f"Student time is an estimate, not a measurement: reading the notebook's text and code at "
                 f"{m['words per minute']} words a minute, plus {m['code']} minutes for each code exercise, "
                 f"{m['integration']} for each integration exercise (the student's code trains a network) "
                 f"and {m['by hand']} for each pen-and-paper exercise (coursekit.course.student_minutes). "
                 "It leaves out the chapter page and its written questions."]
        for scale, rec in (("quick", quick), ("full", full)):
            if rec:
                m = rec["machine"]
                gpu = f", GPU {m['gpu']}" if m.get("gpu") else ", no GPU"
                notes.append(f"{scale}: measured {rec['date']} on {m['cpu']} ({m['cores']} cores{gpu}), "
                             f"Python {m['python']}, torch {m['torch']}; each notebook run once in a fresh kernel.")
                groups = {}
                for path, c in sorted(rec.get("calibrated", {}).items()):
                    key = (c["yardstick"], c["factor"], c["recorded_s"], c["measured_s"], c["date"])
                    groups.setdefault(key, []).append(path.removeprefix("chapters/"))
                for (yard, factor, recorded, measured, date), names in groups.items():
                    notes.append(f"{scale}, calibrated: {', '.join(names)} were timed on {date} on a machine of "
                                 f"another speed and scaled by {factor:g}, the recorded over the re-measured time "
                                 f"of {yard.removeprefix('chapters/')} ({recorded:g} s against {measured:.1f} s), "
                                 "run first on that machine.")
            else:
                notes.append(f"{scale}: not recorded yet (`python -m coursekit.course timings --scale {scale}`).")
        return [table] + [nodes.paragraph(text=n) for n in notes]


def nbtime_role(name, rawtext, text, lineno, inliner, options=None, content=None):
    env = inliner.document.settings.env
    quick = _timings(env, "quick")
    paths = [f"{p}.ipynb" if not p.endswith(".ipynb") else p for p in text.split()]
    missing = [p for p in paths if quick is None or p not in quick["seconds"]]
    if missing or not paths:
        msg = inliner.reporter.error(f"nbtime: no recorded quick time for {missing or text!r}", line=lineno)
        return [inliner.problematic(rawtext, rawtext, msg)], [msg]
    return [nodes.Text(_duration(sum(quick["seconds"][p] for p in paths)))], []


def _title_exercise_links(app, doctree, docname):
    """Give every link to an exercise its title: sphinx-exercise writes "Exercise 3" alone."""
    from coursekit.course import exercise_titles

    titles = getattr(app.env, "normlab_exercise_titles", None)
    if titles is None:
        titles = app.env.normlab_exercise_titles = exercise_titles(app.srcdir)
    for ref in list(doctree.findall(nodes.reference)):
        label = (ref.get("refuri", "").rpartition("#")[2] or ref.get("refid", ""))
        text = ref.astext()
        if label in titles and re.fullmatch(r"Exercise \d+(\.\d+)*", text):
            ref.children = [nodes.inline("", f"{text} ({titles[label]})", classes=["std", "std-ref"])]


def setup(app):
    app.connect("doctree-resolved", _title_exercise_links)
    app.add_directive("course-map", CourseMap)
    app.add_directive("notebook-times", NotebookTimes)
    app.add_role("nbtime", nbtime_role)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
