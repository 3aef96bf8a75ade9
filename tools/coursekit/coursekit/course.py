"""The course as a whole: its chapters (from ``_toc.yml``), how they build on each other, the course
map in the preface, and the measured execution time of every notebook.

Nothing here is typed twice. Chapters, their numbers and their parts come from ``_toc.yml``; titles
from each chapter's ``# `` heading; a chapter *builds on* every earlier chapter its narrative page
links to (``{doc}`` or ``{ref}``), so the map's arrows are the cross-references the text makes.

``python -m coursekit.course timings [--scale quick|full] [--only PATTERN ...] [--calibrate NOTEBOOK]``
executes every notebook of the toc in a fresh kernel and writes ``timings/<scale>.json`` (the
instructor guide renders it). A partial run (``--only``) on a machine of another speed than the one
that recorded the rest can be calibrated: ``--calibrate`` re-times a recorded notebook first and
scales the new times by recorded / measured, keeping the raw times in the file.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from coursekit.notebooks import chapter_markdown, exercises

__all__ = [
    "Chapter",
    "toc_files",
    "chapters",
    "course_map",
    "course_map_svg",
    "time_notebooks",
    "load_timings",
    "STUDENT_MINUTES",
    "student_minutes",
    "chapter_markdown",
    "exercise_titles",
    "main",
]

_DOC = re.compile(r"\{doc\}`(?:[^`<]*<)?([^`>]+)>?`")
_REF = re.compile(r"\{(?:ref|numref)\}`(?:[^`<]*<)?([^`>]+)>?`")
_TARGET = re.compile(r"^\(([\w-]+)\)=\s*$|^\s*:label:\s*([\w-]+)\s*$", re.MULTILINE)


def _root(root) -> Path:
    root = Path(root)
    if not (root / "_toc.yml").exists():
        raise ValueError(f"{root} has no _toc.yml: pass the course repository's root folder")
    return root


def _toc(root):
    import yaml  # the book's toolchain has it; notebooks in Colab never call this

    return yaml.safe_load((_root(root) / "_toc.yml").read_text(encoding="utf-8"))


def toc_files(root) -> list[str]:
    """Every file named in ``_toc.yml``, in reading order, without its extension (root first)."""
    toc = _toc(root)
    files = [toc["root"]]

    def walk(node):
        if isinstance(node, dict):
            files.extend([node["file"]] if "file" in node else [])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc.get("parts", toc.get("chapters", [])))
    return files


def _text(path: Path) -> str:
    """A page's text: a markdown file as it is, a notebook's markdown cells joined."""
    if path.suffix == ".md":
        return path.read_text(encoding="utf-8")
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    return "\n".join(
        "".join(c["source"]) if isinstance(c["source"], list) else c["source"]
        for c in cells
        if c["cell_type"] == "markdown"
    )


@dataclass
class Chapter:
    number: int
    folder: str  # e.g. "scratch": the chapter lives in chapters/<folder>/
    title: str
    part: str
    pages: list[str]  # the index page, then its labs, as toc paths
    builds_on: list[str] = field(default_factory=list)  # folders of earlier chapters it links to


def chapters(root) -> list[Chapter]:
    """The numbered chapters of the toc, in order, with the earlier chapters each one links to."""
    root = _root(root)
    out = []
    for part in _toc(root).get("parts", []):
        if not part.get("numbered"):
            continue
        for entry in part["chapters"]:
            doc = entry["file"]
            if not re.fullmatch(r"chapters/[\w-]+/index", doc):
                raise ValueError(f"_toc.yml: a chapter should be chapters/<name>/index, found {doc!r}")
            text = (root / f"{doc}.md").read_text(encoding="utf-8")
            title = re.search(r"^# (.+)$", text, re.MULTILINE)
            if not title:
                raise ValueError(f"{doc}.md has no '# ' title")
            pages = [doc] + [s["file"] for s in entry.get("sections", [])]
            out.append(Chapter(len(out) + 1, doc.split("/")[1], title.group(1).strip(), part["caption"], pages))

    owner = {}  # label -> chapter folder that defines it
    for ch in out:
        for page in ch.pages:
            path = next(p for p in (root / f"{page}.md", root / f"{page}.ipynb") if p.exists())
            for a, b in _TARGET.findall(_text(path)):
                owner[a or b] = ch.folder
    order = {ch.folder: ch.number for ch in out}
    for ch in out:
        text = (root / f"{ch.pages[0]}.md").read_text(encoding="utf-8")
        linked = {m.split("/")[1] for m in _DOC.findall(text) if m.startswith("../")}
        linked |= {owner[label] for label in _REF.findall(text) if label in owner}
        ch.builds_on = sorted((f for f in linked if f in order and order[f] < ch.number), key=order.get)
    return out


def _direct(chs: list[Chapter]) -> list[tuple[str, str]]:
    """The arrows to draw: builds-on links, minus those another path already implies."""
    deps = {c.folder: set(c.builds_on) for c in chs}

    def reaches(a, b, skip):  # can a reach b through builds-on links, without the direct edge?
        stack = [x for x in deps[a] if x != skip]
        seen = set()
        while stack:
            x = stack.pop()
            if x == b:
                return True
            if x not in seen:
                seen.add(x)
                stack.extend(deps[x])
        return False

    return [(d, c.folder) for c in chs for d in c.builds_on if not reaches(c.folder, d, d)]


PART_COLORS = ["blue", "orange", "green", "purple", "sky", "vermillion"]  # Okabe-Ito names, one per part


def course_map(root):
    """Draw the chapters as boxes in one column per part, with an arrow from each chapter to the
    chapters that build on it. Each box links to its chapter (in SVG output) and carries the id
    ``chapter-<folder>``; each arrow carries ``builds-on-<from>-<to>``."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

    from normlab.runtime.plotting import OKABE_ITO

    chs = chapters(root)
    parts = list(dict.fromkeys(c.part for c in chs))
    width, height, dx, dy = 2.7, 0.95, 3.3, 1.35
    pos = {}
    for i, part in enumerate(parts):
        for j, ch in enumerate(c for c in chs if c.part == part):
            pos[ch.folder] = (i * dx, -j * dy)
    rows = max(-y for _, y in pos.values()) / dy + 1
    fig, ax = plt.subplots(figsize=(2.9 * len(parts), 1.25 * rows + 1.5))
    for i, part in enumerate(parts):
        ax.text(i * dx + width / 2, 0.75, part, ha="center", va="bottom", fontsize=13, weight="bold")
    for ch in chs:
        x, y = pos[ch.folder]
        color = OKABE_ITO[PART_COLORS[parts.index(ch.part) % len(PART_COLORS)]]
        box = FancyBboxPatch((x, y - height), width, height, boxstyle="round,pad=0.02,rounding_size=0.12",
                             facecolor=color, alpha=0.18, edgecolor=color, linewidth=1.5)
        box.set_gid(f"chapter-{ch.folder}")
        box.set_url(f"{ch.pages[0]}.html")
        ax.add_patch(box)
        words, lines = ch.title.split(), [""]
        for w in words:  # wrap the title at about 21 characters
            lines[-1:] = [lines[-1] + " " + w] if len(lines[-1] + w) < 21 else [lines[-1], w]
        label = ax.text(x + width / 2, y - height / 2, f"{ch.number}. " + "\n".join(s.strip() for s in lines),
                        ha="center", va="center", fontsize=12)
        label.set_url(f"{ch.pages[0]}.html")
    for a, b in _direct(chs):
        (xa, ya), (xb, yb) = pos[a], pos[b]
        if xa == xb:  # same part: from the bottom of one box to the top of a later one
            start, end = (xa + width / 2, ya - height), (xb + width / 2, yb)
            style = "arc3,rad=0" if ya - yb <= dy + 1e-9 else "arc3,rad=-0.5"
            if style != "arc3,rad=0":
                start, end = (xa + width, ya - height / 2), (xb + width, yb - height / 2)
        elif xb - xa <= dx + 1e-9:  # neighbouring parts: edge to edge
            start, end = (xa + width, ya - height / 2), (xb, yb - height / 2)
            style = "arc3,rad=0"
        else:  # parts further apart: an arc under the boxes in between
            start, end = (xa + width * 0.6, ya - height), (xb + width * 0.4, yb - height)
            style = f"arc3,rad={0.12 + 0.02 * (xb - xa) / dx}"
        arrow = FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=12, color="0.35",
                                linewidth=1.1, connectionstyle=style, shrinkA=2, shrinkB=2)
        arrow.set_gid(f"builds-on-{a}-{b}")
        ax.add_patch(arrow)
    ax.set_xlim(-0.2, (len(parts) - 1) * dx + width + 0.6)
    ax.set_ylim(-(rows - 1) * dy - height - 0.9, 1.2)
    ax.set_axis_off()
    fig.tight_layout(pad=0.2)
    return fig


def course_map_svg(root) -> str:
    """The course map as an inline ``<svg>`` element (text kept as text, links kept)."""
    import io

    import matplotlib
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "normlab"}):
        fig = course_map(root)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", metadata={"Date": None})
        plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


# ---------------------------------------------------------------------------------------------
# Measured execution times


def _machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__}


def time_notebooks(root, scale: str = "quick", only: str | None = None, progress=print) -> dict:
    """Execute every notebook of the toc (or those whose path contains ``only``) in a fresh kernel
    at NORMLAB_SCALE=scale and return {"scale", "date", "machine", "seconds": {path: s}}."""
    import nbformat
    from nbclient import NotebookClient

    if scale not in ("quick", "full"):
        raise ValueError(f"scale={scale!r}, expected 'quick' or 'full'")
    root = _root(root)
    paths = [f"{d}.ipynb" for d in toc_files(root) if (root / f"{d}.ipynb").exists()]
    paths = [p for p in paths if only is None or only in p]
    if not paths:
        raise ValueError(f"no notebook in the toc matches {only!r}")
    env = {"NORMLAB_SCALE": scale, "NORMLAB_PROGRESS": "0"}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    seconds = {}
    try:
        for path in paths:
            nb = nbformat.read(root / path, as_version=4)
            client = NotebookClient(nb, timeout=3600, kernel_name="python3",
                                    resources={"metadata": {"path": str((root / path).parent)}})
            start = time.perf_counter()
            client.execute()
            seconds[path] = round(time.perf_counter() - start, 1)
            progress(f"{path}: {seconds[path]:.1f} s")
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return {"scale": scale, "date": _dt.date.today().isoformat(), "machine": _machine(), "seconds": seconds}


# The student-time estimate: minutes per exercise of each kind, and a reading speed. These are
# assumptions, not measurements (no student has been timed); the instructor guide says so and
# prints them beside the estimate.
STUDENT_MINUTES = {"words per minute": 100, "code": 20, "integration": 45, "by hand": 15}


def student_minutes(nb: dict) -> dict:
    """Estimate a student's time on a lab notebook: reading plus its exercises, in minutes.

    Reading: the notebook's prose and code at ``STUDENT_MINUTES["words per minute"]`` (slow, for
    technical text with math). Exercises, from their ``{exercise}`` directives: one with a
    ``:class: integration`` option (the student's code trains a network) counts ``integration``
    minutes, one with code to write ``code`` minutes, a pen-and-paper one ``by hand`` minutes.
    Returns the total and each part, rounded to whole minutes.
    """
    words = sum(len("".join(c["source"]).split()) for c in nb["cells"])
    kinds = {"code": 0, "integration": 0, "by hand": 0}
    for label, _title, work, _check in exercises(nb):
        directive = next(c for c in nb["cells"] if re.search(rf":label:\s*{re.escape(label)}\s", "".join(c["source"])))
        integration = re.search(r"^:class:.*\bintegration\b", "".join(directive["source"]), re.MULTILINE)
        kinds["by hand" if work is None else "integration" if integration else "code"] += 1
    reading = words / STUDENT_MINUTES["words per minute"]
    total = reading + sum(n * STUDENT_MINUTES[k] for k, n in kinds.items())
    return {"total": round(total), "reading": round(reading), "exercises": kinds}


_EXERCISE_BLOCK = re.compile(r"^[`:]{3,}\{exercise\}[ \t]*(.*)\n((?:[ \t]*:\w[\w-]*:.*\n)*)", re.MULTILINE)


def exercise_titles(root) -> dict[str, str]:
    """{label: title} of every titled exercise in the chapters' notebooks and pages."""
    titles = {}
    for text in chapter_markdown(_root(root)):
        for title, options in _EXERCISE_BLOCK.findall(text):
            label = re.search(r":label:\s*(\S+)", options)
            if label and title.strip():
                titles[label[1]] = title.strip()
    return titles


def load_timings(root, scale: str) -> dict | None:
    """The recorded timings of one scale (``timings/<scale>.json``), or None if none are recorded."""
    path = _root(root) / "timings" / f"{scale}.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def main(argv=None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m coursekit.course")
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("timings", help="execute every notebook and record its time in timings/<scale>.json")
    t.add_argument("--scale", default="quick", choices=["quick", "full"])
    t.add_argument("--only", nargs="+", help="time only notebooks whose path contains one of these (merged "
                   "into the file)")
    t.add_argument("--calibrate", metavar="NOTEBOOK",
                   help="with --only: first re-time this notebook, whose recorded time stays the yardstick, and "
                        "scale the new times by recorded / measured (each notebook's raw time and factor are "
                        "kept under 'calibrated' until it is re-timed)")
    t.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    old = load_timings(args.root, args.scale)
    factor = None
    if args.calibrate:
        if not (args.only and old and args.calibrate in old["seconds"]):
            parser.error("--calibrate needs --only and a recorded time for the calibration notebook")
        measured = time_notebooks(args.root, args.scale, args.calibrate)["seconds"][args.calibrate]
        factor = old["seconds"][args.calibrate] / measured
    record = {"seconds": {}}
    for pattern in args.only or [None]:
        part = time_notebooks(args.root, args.scale, pattern)
        record = {**part, "seconds": {**record["seconds"], **part["seconds"]}}
    # notebooks timed in an earlier calibrated partial run keep their entry until they are re-timed
    calibrated = {k: v for k, v in ((old or {}).get("calibrated", {}) if args.only else {}).items()
                  if k not in record["seconds"]}
    if factor is not None:
        raw = record["seconds"]
        record["seconds"] = {k: round(v * factor, 1) for k, v in raw.items()}
        for k, v in raw.items():
            calibrated[k] = {"raw_s": v, "factor": round(factor, 3), "yardstick": args.calibrate,
                             "recorded_s": old["seconds"][args.calibrate], "measured_s": measured,
                             "date": record.get("date")}
        print(f"calibration: {args.calibrate} took {measured:.1f} s against {old['seconds'][args.calibrate]} s "
              f"recorded; new times scaled by {factor:.3f}")
    if calibrated:
        record["calibrated"] = calibrated
    out = Path(args.root) / "timings" / f"{args.scale}.json"
    if args.only and old:  # a partial run updates its notebooks and keeps the others
        record["seconds"] = {**old["seconds"], **record["seconds"]}
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {out}: {len(record['seconds'])} notebooks, {sum(record['seconds'].values()):.0f} s in all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
