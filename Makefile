# lmkit book: `make book` (set up, execute the notebooks, build the site) and `make test`.
# Everything lives in .venv; a second run with nothing changed reinstalls nothing.

PYTHON  ?= python3
VENV    := .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.lmkit-installed
KERNEL  := lmkit
PORT    ?= 8000
# Notebooks executed for the site (full parameters); `make book SMOKE=1` for a quick build.
SMOKE   ?= 0

# Offline machines: the data folder beside the checkout (Tiny Shakespeare for chapter 7), as .ci/run does.
ifneq ($(wildcard ../shared/data/tinyshakespeare.txt),)
export LMKIT_DATA ?= $(abspath ../shared/data)
endif

NOTEBOOKS := $(wildcard notebooks/*.ipynb)
EXECUTED  := $(patsubst notebooks/%.ipynb,book/chapters/%.ipynb,$(NOTEBOOKS))
BUILD_LOG := book/_build/build.log
LMKIT_SRC := $(shell find lmkit -name '*.py' 2>/dev/null)
BOOK_SRC  := $(shell find book -maxdepth 2 \( -name '*.md' -o -name '*.yml' -o -name '*.py' -o -name '*.bib' \) \
                -not -path 'book/_build/*' -not -path 'book/chapters/*' 2>/dev/null) \
             $(wildcard book/_ext/calculator_static/*)

.PHONY: help setup book execute test test-fast lab serve clean browser lint

help:
	@echo "make book   set up .venv, execute notebooks/, build book/_build/html"
	@echo "make test   set up .venv, run the whole test suite (unit, notebooks, site)"
	@echo "make lab    JupyterLab on notebooks/ with the lmkit kernel"
	@echo "make serve  serve the built site on http://localhost:$(PORT)"
	@echo "make clean  remove build outputs (keeps .venv; 'make distclean' removes it too)"

# --- environment -----------------------------------------------------------------------------
$(STAMP): pyproject.toml
	@test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --quiet --upgrade pip
	$(VPY) -m pip install --quiet -e ".[book,test,dev]"
	$(VPY) -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (lmkit)" >/dev/null
	@touch $(STAMP)

setup: $(STAMP)

# Headless Chromium for the site test, and CJK fonts so that its Chinese shows as characters
# rather than boxes (Debian packages); installed only when missing.
BROWSER_PKGS := chromium chromium-driver fonts-noto-cjk
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null \
	    && fc-list 2>/dev/null | grep -q "Noto Sans CJK"; then :; \
	elif [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq $(BROWSER_PKGS) >/dev/null; \
	else echo "NOTICE: installing $(BROWSER_PKGS) with sudo (needed by the site test)"; \
	     sudo apt-get update -qq && sudo apt-get install -y -qq $(BROWSER_PKGS) >/dev/null; fi

# --- book ------------------------------------------------------------------------------------
book/chapters/%.ipynb: notebooks/%.ipynb $(LMKIT_SRC) book/tools/execute.py $(STAMP)
	$(VPY) book/tools/execute.py $< $@ $(if $(filter 1,$(SMOKE)),--smoke)

execute: $(EXECUTED)

book/_build/html/index.html: $(EXECUTED) $(BOOK_SRC) $(STAMP)
	$(VPY) book/tools/assets.py
	@mkdir -p book/_build
	@# The build's warnings are kept in book/_build/build.log: the site test (make test) reads them
	@# when it reuses this build instead of building again.
	$(VENV)/bin/jupyter-book build book --quiet > book/_build/.build.log 2>&1; status=$$?; \
	    cat book/_build/.build.log; mv book/_build/.build.log $(BUILD_LOG); exit $$status
	@touch $@

book: book/_build/html/index.html
	@echo "site: book/_build/html/index.html  (make serve to browse it)"

# --- tests -----------------------------------------------------------------------------------
test: $(STAMP) browser
	$(VENV)/bin/ruff check lmkit tests benchmarks book/tools book/_ext
	$(VPY) -m pytest

test-fast: $(STAMP)
	$(VPY) -m pytest -m "not slow and not notebooks and not site and not distributed"

lint: $(STAMP)
	$(VENV)/bin/ruff check lmkit tests benchmarks book/tools book/_ext

# --- reading ---------------------------------------------------------------------------------
lab: $(STAMP)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks $(if $(filter 0,$(shell id -u)),--allow-root)

serve: book/_build/html/index.html
	$(VPY) -m http.server $(PORT) --bind 127.0.0.1 --directory book/_build/html

clean:
	rm -rf book/_build book/chapters .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
