"""coursekit: the maintainers' tooling of the open course on Batch Normalization.

Not the course's library: students install ``normlab`` (``code/``) and never this package, and no
notebook imports it. The modules, each run as ``python -m coursekit.<module>`` by a make target:

- :mod:`coursekit.course`: the chapters from ``_toc.yml``, the course map, recorded notebook times
  (``make timings``; the book's ``_ext/course_pages.py`` renders the map and the times);
- :mod:`coursekit.student`: the student edition, solutions replaced by stubs (``make student``,
  ``make student-book``, ``make notebooks``);
- :mod:`coursekit.grade`: grading handed-in notebooks with their self-checks (``make grade``);
- :mod:`coursekit.colab`: the Colab editions of the labs (``make colab``);
- :mod:`coursekit.seedscan`: every assert's tested value at many seeds (``make seed-scan``);
- :mod:`coursekit.cells`: a notebook's code cells in one process, without Jupyter
  (``chapters/gpu/run_on_gpu.sh``);
- :mod:`coursekit.notebooks`: what the others share (a cell's source, a lab's exercises, the
  chapters' text).

Layering: coursekit imports normlab, never the reverse (``tests/test_hygiene.py`` checks it).
Inside coursekit the imports go one way: ``notebooks`` and ``cells`` import no other module of it;
``course`` and ``grade`` import ``notebooks``; ``student`` imports ``notebooks`` and ``course``;
``colab`` imports ``course`` and ``student``; ``seedscan`` imports ``cells``.
"""
