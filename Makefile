# relgrad book: `make book` builds the website, `make test` runs every test (unit tests + every chapter).
# Both create ./.venv when no virtual environment is active, and install the pinned environment into it.

SHELL := /bin/bash
.DEFAULT_GOAL := help

ifdef VIRTUAL_ENV
PY := $(VIRTUAL_ENV)/bin/python
ENV_DIR := $(VIRTUAL_ENV)
else
PY := $(CURDIR)/.venv/bin/python
ENV_DIR := $(CURDIR)/.venv
endif
STAMP := $(ENV_DIR)/.relgrad-installed
export TQDM_DISABLE ?= 1
export PYTHONHASHSEED ?= 0

.PHONY: help env book test check sync clean student colab pdf book-student archive

help:
	@echo "make book   build the website into _build/html (executes every chapter make test has not just run)"
	@echo "make test   run pytest: unit tests + every book/*.ipynb executed by nbval"
	@echo "make check  pairing check (.md <-> .ipynb in sync, no outputs, setup cells current)"
	@echo "make sync   regenerate setup cells and .ipynb twins from the .md sources"
	@echo "make student  write student notebooks (nbgrader-ready) into _build/student (see book/instructors.md)"
	@echo "make colab  rehearse Colab offline: a fresh venv with only Colab's packages, every chapter run from a clone of HEAD"
	@echo "            (chapters with self-checks as their solution notebook, then every student notebook)"
	@echo "make pdf    the book as one PDF, solutions left out: _build/latex/relgrad-book.pdf (needs TeX Live, see README)"
	@echo "make book-student  the website without solutions, for instructors: _build/student-edition/_build/html"
	@echo "make archive  zips of the chapter notebooks and of the student notebooks into _build/html"
	@echo "make clean  remove _build"

$(PY):
	python3 -m venv $(ENV_DIR)

# Pinned requirements first (never -U), then the package without touching them.
$(STAMP): requirements.txt pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $(STAMP)

env: $(STAMP)

# Chapters that `make test` executed with this code and environment are rendered from that run
# (tools/notebook_cache.py); the rest are executed by the build.
book: $(STAMP)
	$(PY) tools/notebook_cache.py check
	$(ENV_DIR)/bin/jupyter-book build . -W -n --keep-going
	@echo "open _build/html/index.html"

test: $(STAMP)
	$(PY) -m pytest

check: $(STAMP)
	$(PY) tools/check_pairing.py

sync: $(STAMP)
	$(PY) tools/sync_notebooks.py

# COLAB_ARGS="--source worktree" rehearses uncommitted work too; see `python tools/colab_rehearsal.py --help`.
colab: $(STAMP)
	$(PY) tools/colab_rehearsal.py $(COLAB_ARGS)

# STUDENT_ARGS="--with-solutions --out DIR" writes nbgrader source notebooks; `python tools/make_assignments.py --help`.
student: $(STAMP)
	$(PY) tools/make_assignments.py $(STUDENT_ARGS)

# The editions (tools/editions.py): same sources and configuration, chapters from the execution cache.
pdf: $(STAMP)
	$(PY) tools/notebook_cache.py check
	$(PY) tools/editions.py pdf

book-student: $(STAMP)
	$(PY) tools/notebook_cache.py check
	$(PY) tools/editions.py student

archive: $(STAMP)
	$(PY) tools/editions.py archive

clean:
	rm -rf _build
