"""The built book, read as a reader would: headless Chromium on a local copy of the site.

A session fixture builds the site (``book/tools/assets.py`` then ``jupyter-book build``), or reuses
``book/_build/html`` when it is newer than everything it is made from (``.ci/run`` runs ``make book``
first, so CI checks the full build a reader gets, with the warnings of ``book/_build/build.log``
that ``make book`` kept), serves it on a free localhost
port and opens every page of ``_toc.yml`` once in Chromium through Selenium. The tests then check
what the reader sees on each page: it loads with a title; no cell shows a traceback; every formula
was typeset by MathJax and no raw TeX is left; every mermaid diagram became an SVG; every figure of
an executed notebook is present and decoded; and not a single request left localhost. On chapter
5 the layout calculator is driven like a reader would (selects, text fields, a checkbox) and must
show exactly what ``lmkit.costs.calculate`` returns in this process, with Pyodide and ``lmkit/costs/``
served by the site itself.

When notebooks have no fresh executed copy in ``book/chapters/``, the site is built in a temporary
copy of ``book/`` with the notebooks executed in smoke mode (cached in ``build/executed/``), so that
the test never leaves smoke outputs where ``make book`` would publish them.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make browser``): without them the tests are
skipped, or fail under CI.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from lmkit import costs

ROOT = Path(__file__).resolve().parents[1]
BOOK = ROOT / "book"
BUILT = BOOK / "_build" / "html"
EXECUTED_CACHE = ROOT / "build" / "executed"
CHROMIUM = Path(os.environ.get("LMKIT_CHROMIUM", "/usr/bin/chromium"))
CHROMEDRIVER = Path(os.environ.get("LMKIT_CHROMEDRIVER", "/usr/bin/chromedriver"))
BIN = Path(sys.executable).parent
IMAGE_MIMES = ("image/png", "image/jpeg", "image/svg+xml", "image/gif")
RENDERED_MATH = ".MathJax, .MathJax_Display, .MathJax_CHTML, .MathJax_SVG, .MathJax_PHTML, mjx-container"
RAW_TEX = re.compile(r"\\\(|\\\)|\\\[|\\\]|\$\$|(?<![\w$])\$(?=[^\s$])[^$\n]{1,120}(?<=[^\s$])\$(?![\w$])")
# MyST roles that did not render (a role in generated markdown, a typo): the reader sees the markup.
LITERAL_ROLE = re.compile(r"\{(?:cite|ref|numref|doc|eq|term|glue:?\w*)(?::\w+)?\}`?[^`\s]*`?")
# What a reader of a cell's output should never see: warnings and this machine's paths.
OUTPUT_WARNING = re.compile(r"\b\w*Warning\b|/work/|/tmp/|/home/|site-packages")
TRACEBACK = "Traceback"
# Console errors that are not the site's: the browser asks for /favicon.ico, and pydata-sphinx-theme
# logs a console.error when a fresh browser profile has no stored light/dark mode yet.
BENIGN_CONSOLE = re.compile(r"favicon\.ico|Got invalid theme mode: \. Resetting to auto")
STDERR_ERROR = re.compile(r"Traceback|^\s*\w*(Error|Exception): ", re.M)

pytestmark = pytest.mark.site


def toc_pages() -> list[str]:
    """Docnames of every page in ``_toc.yml``, root first."""
    toc = yaml.safe_load((BOOK / "_toc.yml").read_text(encoding="utf-8"))
    pages = [toc["root"]]

    def walk(node: object) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("file"), str):
                pages.append(node["file"])
            for key, value in node.items():
                if key != "root":
                    walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk({k: v for k, v in toc.items() if k != "root"})
    return [re.sub(r"\.(md|ipynb)$", "", p) for p in pages]


PAGES = toc_pages()
CHAPTERS = [p.split("/", 1)[1] for p in PAGES if p.startswith("chapters/")]


# --- building the site -----------------------------------------------------------------------
def _newest(paths) -> float:
    return max((p.stat().st_mtime for p in paths if p.is_file()), default=0.0)


def _lmkit_mtime() -> float:
    return _newest((ROOT / "lmkit").rglob("*.py"))


def _fresh_executed(name: str, candidate: Path) -> bool:
    source = ROOT / "notebooks" / f"{name}.ipynb"
    return candidate.is_file() and candidate.stat().st_mtime >= max(source.stat().st_mtime, _lmkit_mtime())


def _book_inputs(book: Path) -> list[Path]:
    skip = {"_build", "_vendor", ".ipynb_checkpoints", "__pycache__"}
    return [p for p in book.rglob("*") if p.is_file() and not skip & set(p.relative_to(book).parts)]


ENVIRONMENT = BOOK / "_build" / ".doctrees" / "environment.pickle"
BUILD_LOG = BOOK / "_build" / "build.log"  # written by `make book` after its build


def _existing_build_log() -> str | None:
    """The log `make book` kept of the existing build, when it was written after that build."""
    if BUILD_LOG.is_file() and BUILD_LOG.stat().st_mtime >= ENVIRONMENT.stat().st_mtime:
        return BUILD_LOG.read_text(encoding="utf-8", errors="replace")
    return None


def _existing_build_is_fresh() -> bool:
    # Sphinx rewrites its environment on every build, even one that finds nothing to do.
    environment = ENVIRONMENT
    if not environment.is_file():
        return False
    for name in CHAPTERS:
        if (ROOT / "notebooks" / f"{name}.ipynb").is_file() and not _fresh_executed(
            name, BOOK / "chapters" / f"{name}.ipynb"
        ):
            return False
    return environment.stat().st_mtime >= _newest(_book_inputs(BOOK)) and all(
        (BUILT / f"{page}.html").is_file() for page in PAGES
    )


def _executed_notebook(name: str) -> Path:
    """A fresh executed copy of ``notebooks/<name>.ipynb``: the book's own, or a cached smoke run."""
    for candidate in (BOOK / "chapters" / f"{name}.ipynb", EXECUTED_CACHE / f"{name}.ipynb"):
        if _fresh_executed(name, candidate):
            return candidate
    from execute import execute_notebook  # book/tools, put on sys.path by conftest

    target = EXECUTED_CACHE / f"{name}.ipynb"
    try:
        result = execute_notebook(ROOT / "notebooks" / f"{name}.ipynb", target, smoke=True, timeout=600)
    except Exception as exc:  # papermill's error names the failing cell
        pytest.fail(f"notebooks/{name}.ipynb does not run (SMOKE=True), so the site cannot be built: {exc}")
    print(f"site: executed {name} in smoke mode in {result.seconds:.0f} s")
    return target


def _build(book: Path) -> str:
    """Prepare assets and run Jupyter Book on ``book``; return the build log."""
    subprocess.run(
        [sys.executable, str(BOOK / "tools" / "assets.py"), "--book", str(book),
         "--cache", str(ROOT / ".cache")],
        check=True, cwd=ROOT, timeout=900,
    )
    jb = BIN / "jupyter-book"
    command = [str(jb)] if jb.exists() else [sys.executable, "-m", "jupyter_book.cli.main"]
    proc = subprocess.run(
        [*command, "build", str(book), "--builder", "html"],
        cwd=ROOT, capture_output=True, text=True, timeout=1200,
    )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        pytest.fail(f"jupyter-book build failed ({proc.returncode}):\n{log[-6000:]}")
    return log


@dataclass
class Site:
    html: Path
    executed: dict[str, Path]  # chapter name -> executed notebook rendered on its page
    log: str | None  # the build log; None when an existing build was reused without make book's log


@pytest.fixture(scope="session")
def site(tmp_path_factory) -> Site:
    started = time.perf_counter()
    if _existing_build_is_fresh():
        executed = {n: BOOK / "chapters" / f"{n}.ipynb" for n in CHAPTERS
                    if (BOOK / "chapters" / f"{n}.ipynb").is_file()}
        print(f"site: reusing the fresh build in {BUILT}")
        return Site(BUILT, executed, _existing_build_log())
    executed = {n: _executed_notebook(n) for n in CHAPTERS if (ROOT / "notebooks" / f"{n}.ipynb").is_file()}
    book = tmp_path_factory.mktemp("site") / "book"
    shutil.copytree(BOOK, book, ignore=shutil.ignore_patterns("_build", "chapters", ".ipynb_checkpoints"))
    (book / "chapters").mkdir()
    for name, notebook in executed.items():
        shutil.copyfile(notebook, book / "chapters" / f"{name}.ipynb")
    log = _build(book)
    print(f"site: built in {time.perf_counter() - started:.0f} s")
    return Site(book / "_build" / "html", executed, log)


# --- serving and browsing --------------------------------------------------------------------
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".mjs": "text/javascript", ".js": "text/javascript", ".woff": "font/woff", ".svg": "image/svg+xml",
    }

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="session")
def server(site: Site):
    handler = functools.partial(_QuietHandler, directory=str(site.html))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def _missing_browser_message() -> str | None:
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("the selenium package (pip install -e '.[test]')")
    if missing:
        return (f"the site test needs {', '.join(missing)}: "
                "run `make browser` (Debian chromium + chromium-driver)")
    return None


@pytest.fixture(scope="session")
def driver():
    message = _missing_browser_message()
    if message:
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="lmkit-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1280,1600", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    browser = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    browser.set_page_load_timeout(60)
    browser.set_script_timeout(60)
    browser.get("about:blank")
    browser.get_log("performance")  # the start page's requests are not the site's
    yield browser
    browser.quit()
    shutil.rmtree(profile, ignore_errors=True)


@dataclass
class PageReport:
    page: str
    status: int
    title: str
    h1: str
    math_elements: int
    math_unrendered: list[str]
    math_errors: list[str]
    mathjax: str
    raw_tex: list[str]
    diagrams: int
    diagram_svgs: list[dict]
    images: list[dict]
    output_errors: list[str]
    literal_roles: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    wide: list[str] = field(default_factory=list)
    prose_cells: list[str] = field(default_factory=list)
    figures: list[dict] = field(default_factory=list)
    requests: set[str] = field(default_factory=set)
    console_errors: list[str] = field(default_factory=list)
    screenshot: Path | None = None


_WAIT_MATHJAX = """
const done = arguments[arguments.length - 1];
if (!document.querySelector('.math, script[type^="math/tex"]')) { done('none'); return; }
const t0 = Date.now();
(function poll() {
  if (window.MathJax && MathJax.Hub && MathJax.isReady) { MathJax.Hub.Queue(() => done('typeset')); }
  else if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    MathJax.startup.promise.then(() => done('typeset'));
  }
  else if (Date.now() - t0 > 30000) { done(window.MathJax ? 'not ready' : 'not loaded'); }
  else { setTimeout(poll, 100); }
})();
"""

_INSPECT = """
const RENDERED = arguments[0];
const article = document.querySelector('main') || document.body;
const texOf = (el) => (el.getAttribute('data-tex') || el.textContent || '').trim().slice(0, 80);
// Sphinx's math elements; MathJax 2's output has inner spans of class "math" too, skip those.
const maths = [...article.querySelectorAll('.math')].filter(m => !m.id.startsWith('MathJax-')
  && !(m.parentElement && m.parentElement.closest(RENDERED)));
const unrendered = maths.filter(m => !m.querySelector(RENDERED)).map(texOf);
const mathErrors = [...article.querySelectorAll('.MathJax_Error, .merror, .noError, mjx-merror')]
  .map(e => e.textContent.trim().slice(0, 120));
// Text a reader sees, outside code: raw TeX delimiters there mean MathJax did not typeset it.
const visible = [];
const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
const SKIP = 'pre, code, script, style, textarea, .highlight, .MathJax_Preview, .MJX_Assistive_MathML';
for (let node = walker.nextNode(); node; node = walker.nextNode()) {
  const parent = node.parentElement;
  if (!parent || parent.closest(SKIP)) continue;
  if (parent.offsetParent === null && getComputedStyle(parent).position !== 'fixed') continue;
  visible.push(node.textContent);
}
const diagrams = [...document.querySelectorAll('.mermaid')];
const svgs = diagrams.map(d => {
  const svg = d.querySelector('svg');
  if (!svg) return {svg: false, text: d.textContent.trim().slice(0, 80)};
  const box = svg.getBoundingClientRect();
  return {svg: true, nodes: svg.querySelectorAll('g.node, .node').length, width: box.width,
          height: box.height, error: /Syntax error|Parse error/i.test(svg.textContent)};
});
const images = [...article.querySelectorAll('img')].map(img => ({
  src: img.currentSrc || img.src, complete: img.complete, width: img.naturalWidth,
  output: !!img.closest('.cell_output')}));
const texts = (selector) => [...article.querySelectorAll(selector)].map(e => e.textContent);
const shown = (el) => el.offsetParent !== null;
const snippet = (el) => (el.textContent || '').trim().replace(/\\s+/g, ' ').slice(0, 60);
// Output blocks and tables wider than the text column scroll sideways: a reader misses columns.
const wide = [...article.querySelectorAll('.cell_output pre, .cell_output table')].filter(shown)
  .filter(el => el.scrollWidth > el.clientWidth + 2
                || el.getBoundingClientRect().width > el.closest('.cell').getBoundingClientRect().width + 2)
  .map(el => `${el.tagName.toLowerCase()} ${el.scrollWidth}px in ${Math.round(el.clientWidth)}px: `
              + snippet(el));
// A table printed as text (a rule of dashes under its header) instead of rendered as a table.
const printedTables = [...article.querySelectorAll('.cell_output pre')]
  .filter(el => /^ *-{3,}( +-{3,}){2,} *$/m.test(el.textContent)).map(snippet);
// A code cell shown to the reader whose only output is prose: the paragraph is read twice.
const HIDDEN_INPUT = ['tag_hide-input', 'tag_remove-input', 'tag_hide-cell', 'tag_remove-cell'];
const PROSE = new Set(['P', 'UL', 'OL', 'DL', 'BLOCKQUOTE', 'H2', 'H3', 'H4', 'H5', 'H6']);
const proseCells = [...article.querySelectorAll('.cell')].filter(cell =>
    !HIDDEN_INPUT.some(t => cell.classList.contains(t)) && cell.querySelector(':scope > .cell_input'))
  .filter(cell => {
    const outs = [...cell.querySelectorAll(':scope > .cell_output')];
    const parts = outs.flatMap(o => [...o.children]);
    return parts.length > 0 && parts.every(p => PROSE.has(p.tagName));
  }).map(cell => snippet(cell.querySelector(':scope > .cell_output')));
// Figures of executed cells: numbered, with a caption, and drawn at a scale where their text reads.
const figures = [...article.querySelectorAll('.cell_output img')].map(img => {
  const figure = img.closest('figure');
  return {src: (img.currentSrc || img.src).split('/').pop(),
          caption: !!(figure && figure.querySelector('figcaption')),
          number: !!(figure && figure.querySelector('.caption-number')),
          scale: img.naturalWidth ? img.getBoundingClientRect().width / img.naturalWidth : 0,
          natural: img.naturalWidth};
});
const h1 = document.querySelector('article h1') || document.querySelector('main h1, h1');
return {title: document.title, h1: h1 ? h1.textContent.trim() : '', mathElements: maths.length,
        unrendered, mathErrors, visible: visible.join(' '), diagrams: diagrams.length, svgs, images,
        tracebacks: texts('.output.traceback, .output.error'), stderr: texts('.output.stderr'),
        outputs: texts('.cell_output'), wide, printedTables, proseCells, figures,
        resources: performance.getEntriesByType('resource').map(e => e.name),
        dom: [...document.querySelectorAll('script[src], link[href], img[src], iframe[src], source[src]')]
          .filter(e => !(e.tagName === 'LINK' && /^(canonical|alternate|index|search|next|prev)$/i
                                                  .test(e.getAttribute('rel') || '')))
          .map(e => e.src || e.href)};
"""


def _http_status(url: str) -> int:
    with urllib.request.urlopen(url, timeout=30) as response:  # noqa: S310 - localhost only
        return response.status


def _load(driver, url: str, page: str) -> PageReport:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get_log("performance")  # drain what earlier pages left
    driver.get_log("browser")
    status = _http_status(url)
    driver.get(url)
    WebDriverWait(driver, 60).until(lambda d: d.execute_script("return document.readyState") == "complete")
    mathjax = driver.execute_async_script(_WAIT_MATHJAX)
    # mermaid renders after the load event; give every diagram the chance to become an SVG.
    deadline = time.time() + 45
    while time.time() < deadline and driver.execute_script(
        "return [...document.querySelectorAll('.mermaid')].some(d => !d.querySelector('svg'))"
    ):
        time.sleep(0.2)
    # decode every image, including any the browser would load lazily
    driver.execute_script("document.querySelectorAll('img').forEach(i => { i.loading = 'eager'; });")
    deadline = time.time() + 30
    while time.time() < deadline and not driver.execute_script(
        "return [...document.images].every(i => i.complete)"
    ):
        time.sleep(0.2)
    info = driver.execute_script(_INSPECT, RENDERED_MATH)
    requests = set(info["resources"]) | set(info["dom"])
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            requests.add(message["params"]["request"]["url"])
    console = [f"{e['level']}: {e['message'][:300]}" for e in driver.get_log("browser")
               if e["level"] == "SEVERE" and not BENIGN_CONSOLE.search(e["message"])]
    errors = [f"error output: {t.strip()[:300]}" for t in info["tracebacks"]]
    errors += [f"stderr: {t.strip()[:300]}" for t in info["stderr"] if STDERR_ERROR.search(t)]
    errors += [f"output: {t.strip()[:300]}" for t in info["outputs"] if TRACEBACK in t]
    report = PageReport(
        page=page, status=status, title=info["title"], h1=info["h1"],
        math_elements=info["mathElements"], math_unrendered=info["unrendered"],
        math_errors=info["mathErrors"], mathjax=mathjax,
        raw_tex=sorted(set(RAW_TEX.findall(info["visible"]))), diagrams=info["diagrams"],
        diagram_svgs=info["svgs"], images=info["images"], output_errors=errors, requests=requests,
        console_errors=console,
        literal_roles=sorted(set(LITERAL_ROLE.findall(info["visible"]))),
        warnings=[t.strip()[:200] for t in info["stderr"] if t.strip()]
        + [m.group(0) + ": " + t.strip()[max(0, m.start() - 80):m.start() + 80]
           for t in info["outputs"] for m in [OUTPUT_WARNING.search(t)] if m],
        wide=info["wide"] + [f"printed table: {t}" for t in info["printedTables"]],
        prose_cells=info["proseCells"], figures=info["figures"],
    )
    shots = os.environ.get("LMKIT_SITE_SCREENSHOTS")
    if shots:
        Path(shots).mkdir(parents=True, exist_ok=True)
        report.screenshot = Path(shots) / f"{page.replace('/', '_')}.png"
        height = driver.execute_script("return document.documentElement.scrollHeight")
        driver.set_window_size(1280, min(int(height) + 200, 16000))  # the whole page
        driver.save_screenshot(str(report.screenshot))
        driver.set_window_size(1280, 1600)
    return report


@pytest.fixture(scope="session")
def pages(driver, server):
    """Each page is opened once; every test reads its report."""
    cache: dict[str, PageReport] = {}

    def get(page: str) -> PageReport:
        if page not in cache:
            cache[page] = _load(driver, server + f"{page}.html", page)
        return cache[page]

    return get


# --- the tests -------------------------------------------------------------------------------
def test_toc_lists_every_chapter_of_the_design():
    expected = ["intro", *(f"chapters/{n}" for n in (
        "01_concepts", "02_algorithms", "03_mathematics", "04_project", "05_parallelism_theory",
        "06_hybrid_parallel_practice", "07_efficiency", "08_applications")),
        "tools", "outlook", "faq", "glossary", "references"]
    assert PAGES == expected
    for name in CHAPTERS:
        assert (BOOK / "placeholders" / f"{name}.md").is_file(), f"no placeholder for {name}"
        assert "in preparation" in (BOOK / "placeholders" / f"{name}.md").read_text(encoding="utf-8")


def test_build_has_no_warnings(site: Site):
    if site.log is None:
        pytest.skip("reused an existing build of book/_build/html without its log (book/_build/build.log)")
    problems = [line for line in site.log.splitlines() if re.search(r"\b(WARNING|ERROR|CRITICAL)\b", line)]
    assert not problems, "jupyter-book build warned:\n" + "\n".join(problems[:40])


def test_every_page_was_built(site: Site):
    for page in PAGES:
        assert (site.html / f"{page}.html").is_file(), f"{page}.html is missing from {site.html}"
    for name in CHAPTERS:
        html = (site.html / "chapters" / f"{name}.html").read_text(encoding="utf-8")
        if name in site.executed:
            assert "in preparation" not in html, f"{name}: the executed notebook was not rendered"
        else:
            assert "in preparation" in html, f"{name}: expected the placeholder page"


@pytest.mark.parametrize("page", PAGES)
def test_page_loads_with_a_title(pages, page):
    report = pages(page)
    assert report.status == 200
    assert report.h1, f"{page}: no <h1>"
    assert report.title.strip(), f"{page}: empty <title>"


@pytest.mark.parametrize("page", PAGES)
def test_no_error_output(pages, page):
    report = pages(page)
    assert not report.output_errors, f"{page} shows errors:\n" + "\n---\n".join(report.output_errors)


@pytest.mark.parametrize("page", PAGES)
def test_no_script_errors(pages, page):
    report = pages(page)
    assert not report.console_errors, f"{page}: errors in the browser console:\n" + "\n".join(
        report.console_errors)


@pytest.mark.parametrize("page", PAGES)
def test_math_is_typeset(pages, page):
    report = pages(page)
    if report.math_elements:
        assert report.mathjax == "typeset", f"{page}: MathJax {report.mathjax}"
    assert not report.math_unrendered, f"{page}: formulas left untypeset: {report.math_unrendered[:5]}"
    assert not report.math_errors, f"{page}: TeX errors: {report.math_errors[:5]}"
    assert not report.raw_tex, f"{page}: raw TeX delimiters visible in the text: {report.raw_tex}"


@pytest.mark.parametrize("page", PAGES)
def test_no_literal_roles(pages, page):
    report = pages(page)
    roles = report.literal_roles
    assert not roles, f"{page}: roles shown as markup, not rendered: {roles[:5]}"


@pytest.mark.parametrize("page", PAGES)
def test_no_warnings_or_machine_paths_in_outputs(pages, page):
    report = pages(page)
    assert not report.warnings, f"{page}: outputs show warnings or this machine's paths:\n" + "\n".join(
        report.warnings[:8])


@pytest.mark.parametrize("page", PAGES)
def test_outputs_fit_the_column(pages, page):
    report = pages(page)
    wide = "\n".join(report.wide[:10])
    assert not report.wide, f"{page}: output blocks wider than the text column:\n{wide}"


@pytest.mark.parametrize("page", PAGES)
def test_no_visible_code_cell_only_prints_prose(pages, page):
    report = pages(page)
    cells = "\n".join(report.prose_cells)
    assert not cells, (f"{page}: code cells in view whose only output is prose (write markdown with glued "
                       f"values, or hide the input):\n{cells}")


# An image drawn at under this fraction of its pixel width shrinks 9-pt text below about 7 px.
MIN_FIGURE_SCALE = 0.55


@pytest.mark.parametrize("page", PAGES)
def test_figures_are_numbered_captioned_and_legible(pages, page):
    report = pages(page)
    uncaptioned = [f["src"] for f in report.figures if not (f["caption"] and f["number"])]
    assert not uncaptioned, f"{page}: figures without a numbered caption: {uncaptioned}"
    shrunk = [f"{f['src']} at {f['scale']:.2f} of {f['natural']} px" for f in report.figures
              if f["natural"] and f["scale"] < MIN_FIGURE_SCALE]
    assert not shrunk, f"{page}: figures drawn so small their text cannot be read: {shrunk}"


@pytest.mark.parametrize("page", PAGES)
def test_diagrams_are_drawn(pages, page):
    report = pages(page)
    for i, svg in enumerate(report.diagram_svgs):
        assert svg["svg"], f"{page}: mermaid diagram {i} was not rendered: {svg.get('text')!r}"
        assert not svg["error"], f"{page}: mermaid diagram {i} has a syntax error"
        assert svg["nodes"] > 0 and svg["width"] > 0 and svg["height"] > 0, f"{page}: diagram {i} is empty"


@pytest.mark.parametrize("page", PAGES)
def test_figures_are_loaded(pages, site: Site, page):
    report = pages(page)
    broken = [img["src"] for img in report.images if not (img["complete"] and img["width"] > 0)]
    assert not broken, f"{page}: images that did not load: {broken}"
    name = page.split("/", 1)[1] if page.startswith("chapters/") else None
    if name in site.executed:
        notebook = json.loads(site.executed[name].read_text(encoding="utf-8"))
        expected = sum(
            1 for cell in notebook["cells"] if cell["cell_type"] == "code"
            for output in cell.get("outputs", []) if any(m in output.get("data", {}) for m in IMAGE_MIMES)
        )
        shown = sum(1 for img in report.images if img["output"])
        assert shown >= expected, f"{page}: the notebook has {expected} image outputs, the page shows {shown}"


@pytest.mark.parametrize("page", PAGES)
def test_nothing_is_fetched_from_outside(pages, server, page):
    report = pages(page)
    assert report.requests, f"{page}: no request was recorded at all"
    # chrome:// and the like are the browser's own pages (its start page), never network traffic.
    network = [u for u in report.requests if re.match(r"(?i)(https?|wss?|ftp):", u)]
    outside = sorted(u for u in network if not u.startswith(server))
    assert any(u.startswith(server) for u in network), f"{page}: no request to the site was recorded"
    assert not outside, f"{page} requested resources from outside the site: {outside}"


def test_intro_shows_formulas_and_the_chapter_map(pages):
    report = pages("intro")
    assert report.math_elements >= 2 and report.mathjax == "typeset"
    assert report.diagrams == 1
    svg = report.diagram_svgs[0]
    assert svg["svg"] and svg["nodes"] >= 9, f"the chapter map was not drawn: {svg}"
    # ... typeset by the vendored MathJax 2 and drawn by the vendored mermaid, not a CDN fallback
    mathjax = "_static/mathjax/MathJax.js?config=TeX-AMS-MML_HTMLorMML-full"
    assert any(u.endswith(mathjax) for u in report.requests)
    assert any(u.endswith("_static/mermaid/mermaid.esm.min.mjs") for u in report.requests)
    assert any("/_static/mathjax/fonts/" in u for u in report.requests), "MathJax used no web font"


def test_intro_links_the_glossary(site: Site):
    html = (site.html / "intro.html").read_text(encoding="utf-8")
    assert 'href="glossary.html"' in html


# --- Chinese text ------------------------------------------------------------------------------
# For every distinct Chinese character of the page's first heading: its rendering in the heading's
# own font stack (a canvas uses the same font fallback as the page), that of a code point no font
# has (U+10FFFD: the missing-glyph box), and the widths of both strings.
_CJK_PROBE = """
const h = document.querySelector('h1');
const style = getComputedStyle(h);
const chars = [...new Set([...h.textContent].filter(c => /[\\u4e00-\\u9fff]/.test(c)))];
const canvas = document.createElement('canvas');
canvas.width = 80; canvas.height = 80;
const ctx = canvas.getContext('2d', {willReadFrequently: true});
ctx.font = `64px ${style.fontFamily}`;
const render = c => {
  ctx.clearRect(0, 0, 80, 80); ctx.fillText(c, 4, 66);
  const px = ctx.getImageData(0, 0, 80, 80).data;
  let hash = 0, ink = 0;
  for (let i = 3; i < px.length; i += 4) { hash = (hash * 31 + px[i]) | 0; ink += px[i] > 0; }
  return {hash, ink};
};
const box = render('\\u{10FFFD}');
const glyphs = chars.map(render);
return {family: style.fontFamily, chars: chars.join(''), box: box.hash,
        hashes: glyphs.map(g => g.hash), ink: glyphs.map(g => g.ink),
        width: ctx.measureText(chars.join('')).width,
        boxWidth: ctx.measureText('\\u{10FFFD}'.repeat(chars.length)).width};
"""


def test_chinese_headings_render_with_glyphs(pages, driver, server):
    page = "chapters/01_concepts"
    pages(page)  # builds the site if needed
    driver.get(server + f"{page}.html")
    probe = driver.execute_script(_CJK_PROBE)
    assert len(probe["chars"]) >= 2, f"the heading of {page} has no Chinese to check: {probe}"
    assert "Noto Sans CJK SC" in probe["family"], f"no CJK font in the site's font stack: {probe['family']}"
    n = len(probe["chars"])
    # drawn glyphs: each character has ink, differs from the missing-glyph box and from the others
    assert all(ink > 50 for ink in probe["ink"]), probe
    assert probe["box"] not in probe["hashes"], f"Chinese drawn as missing-glyph boxes: {probe}"
    assert len(set(probe["hashes"])) == n, f"distinct characters drawn alike (boxes): {probe}"
    # CJK glyphs are full-width: n characters at 64 px are about n x 64 px wide
    assert abs(probe["width"] - 64 * n) < 0.1 * 64 * n, probe
    assert abs(probe["width"] - probe["boxWidth"]) > 1.0, probe


# --- the layout calculator of chapter 5 --------------------------------------------------------
CALCULATOR_PAGE = "chapters/05_parallelism_theory"
# Every input of the calculator (book/_ext/calculator.py), in the order a reader sets them: the
# schedule first, because choosing one adjusts the virtual stages; the gradients' dtype ("reduce")
# after the precision, because only mixed precision shows it (and sends it).
CALCULATOR_FIELDS = ("schedule", "dp", "cp", "tp", "pp", "ep", "zero", "sequence_parallel", "recompute",
                     "microbatches", "virtual_stages", "global_batch", "precision", "reduce",
                     "device_memory_gb", "imbalance")
MODEL_FIELDS = ("n_layer", "d_model", "n_head", "n_kv_head", "d_ff", "vocab_size", "seq_len", "n_experts",
                "moe_top_k", "moe_every", "moe_d_ff", "n_shared_experts", "mlp", "tie_embeddings")
# The page's "network" select sets three fields of the model at once.
NETWORKS = {"gpt2": {"pos": "learned", "norm": "layer", "bias": True},
            "llama": {"pos": "rope", "norm": "rms", "bias": False}}


def _typed(network: str, **fields) -> dict:
    """A model typed into the form: every field the page sends for a custom model."""
    return {"n_kv_head": 0, "d_ff": 0, "mlp": "plain", "tie_embeddings": True, "n_experts": 0,
            "moe_top_k": 2, "moe_every": 1, "moe_d_ff": 0, "n_shared_experts": 0, **fields,
            **NETWORKS[network]}


def _inputs(model: str | dict, **layout) -> dict:
    """Every field the calculator sends: a preset name or a typed model, and the layout."""
    base = {"dp": 1, "cp": 1, "tp": 1, "pp": 1, "ep": 1, "zero": 0, "sequence_parallel": False,
            "recompute": "none", "microbatches": 1, "schedule": "1f1b", "virtual_stages": 1,
            "global_batch": 8,
            "precision": "mixed", "reduce": "fp32", "device_memory_gb": 80, "imbalance": 1}
    inputs = {("model" if isinstance(model, dict) else "preset"): model, **base, **layout}
    if inputs["precision"] != "mixed":  # the page hides the gradients' dtype and sends none
        del inputs["reduce"]
    return inputs


CALCULATOR_CASES = {
    "llama2-7b tp8 zero1": _inputs("llama2-7b", tp=8, zero=1, sequence_parallel=True, recompute="selective"),
    "llama3-70b tp8 pp4 1f1b m16 bf16 gradients": _inputs("llama3-70b", dp=2, tp=8, pp=4, zero=1,
                                                          sequence_parallel=True, microbatches=16,
                                                          global_batch=64, reduce="bf16"),
    "gpt3 tp8 pp16 interleaved v2 dp8": _inputs("gpt3-175b", dp=8, tp=8, pp=16, zero=1,
                                                sequence_parallel=True, recompute="selective",
                                                microbatches=32, schedule="interleaved", virtual_stages=2,
                                                global_batch=1536),
    "gpt2 dp8 zero3": _inputs("gpt2-124m", dp=8, zero=3, microbatches=2, global_batch=64,
                              device_memory_gb=40),
    # one sequence of 32k tokens: context parallelism across the ring of 2 x 4 tensor-parallel ranks
    # a Llama-style network with grouped-query attention (8 key/value heads) on a sequence of 32k tokens:
    # context parallelism across the ring of 2 x 4 tensor-parallel ranks, passing the key/value heads only
    "custom 32k tokens cp2 tp4 pp2": _inputs(_typed("llama", n_layer=32, d_model=4096, n_head=32, n_kv_head=8,
                                                    d_ff=14336, vocab_size=32000, seq_len=32768, mlp="swiglu",
                                                    tie_embeddings=False),
                                             dp=2, cp=2, tp=4, pp=2, zero=1, sequence_parallel=True,
                                             microbatches=2, global_batch=4),
    # Mixtral 8x7B: one expert per rank (ep8 inside dp8), whole experts under tp2 with sequence parallelism
    "mixtral ep8 dp8 tp2 zero1 imbalance 1.2": _inputs("mixtral-8x7b", dp=8, tp=2, ep=8, zero=1,
                                                       sequence_parallel=True, microbatches=4,
                                                       global_batch=64, imbalance=1.2),
    # a typed model with experts every second block and a shared expert, ep2 inside dp2 x cp2
    "custom experts every 2 shared cp2 ep2": _inputs(_typed("llama", n_layer=8, d_model=1024, n_head=16,
                                                            vocab_size=32000, seq_len=8192, mlp="swiglu",
                                                            n_experts=16, moe_top_k=2, moe_every=2,
                                                            moe_d_ff=1024, n_shared_experts=1),
                                                     dp=2, cp=2, ep=2, zero=2, global_batch=4),
    "custom model gpipe fp32": _inputs(_typed("gpt2", n_layer=24, d_model=2048, n_head=16, vocab_size=50304,
                                              seq_len=4096), dp=4, tp=2, pp=2, zero=2, recompute="full",
                                       microbatches=8, schedule="gpipe", global_batch=64, precision="fp32",
                                       device_memory_gb=24.5),
}
# A layout the model forbids: 32 heads do not split over 3 tensor-parallel ranks.
CALCULATOR_IMPOSSIBLE = {**CALCULATOR_CASES["llama2-7b tp8 zero1"], "tp": 3, "sequence_parallel": False}


def _shown(key: str, value) -> str:
    """What the page must display for an output (the formatting of lmkit-calculator.mjs's glue)."""
    if key.startswith(("memory-", "communication-")) or key in ("device-memory", "kv-cache-per-token"):
        return costs.format_bytes(value)
    if key in ("num-params", "active-params", "expert-params-per-rank"):
        return f"{value / 1e9:.3f} B"
    if key == "all-to-all-per-layer":
        return costs.format_bytes(value)
    if key == "bubble":
        return f"{100 * value:.2f} %"
    if key == "fits":
        return "yes" if value else "no"
    return str(value)


def _expected_outputs(result: dict) -> dict:
    """``data-output`` key -> value, as the page lays out `costs.calculate`'s result."""
    out = {"model": result["model"], "num-params": result["num_params"],
           "active-params": result["active_params"],
           "expert-params-per-rank": result["expert_params_per_rank"],
           "all-to-all-per-layer": result["all_to_all_per_layer"],
           "kv-cache-per-token": result["kv_cache_per_token"], "layout": result["layout"],
           "stage": result["stage"], "device-memory": result["device_memory"], "fits": result["fits"],
           "bubble": result["bubble"], "notes": result["notes"]}
    for group in ("memory", "communication"):
        out.update({f"{group}-{k}": v for k, v in result[group].items()})
    return out


CALCULATOR_STATE = "return (document.getElementById('lmkit-calculator') || {dataset: {}}).dataset.state"


def _open_calculator(driver, server: str, fresh: bool = False):
    """Chapter 5 in Chromium with its calculator started (its button clicked, as a reader does);
    reloaded only if needed (or `fresh`)."""
    from selenium.webdriver.support.ui import WebDriverWait

    url = server + f"{CALCULATOR_PAGE}.html"
    state = CALCULATOR_STATE
    started = driver.current_url.startswith(url) and driver.execute_script(state) in ("ready", "error")
    if fresh or not started:
        driver.get_log("performance")  # drain what earlier pages left
        driver.get_log("browser")
        driver.get(url)
        driver.find_element("id", "calc-start").click()
        WebDriverWait(driver, 120, poll_frequency=0.2).until(
            lambda d: d.execute_script(state) not in ("idle", "loading"))
    current = driver.execute_script(state)
    assert current in ("ready", "error"), (
        f"the calculator did not start ({current}): {driver.find_element('id', 'calc-status').text}")
    return driver


@pytest.fixture
def calculator(site: Site, driver, server):
    if "05_parallelism_theory" not in site.executed:
        pytest.skip("chapter 5 is not executed in this build")
    return _open_calculator(driver, server)


def _set(driver, key: str, value) -> None:
    from selenium.webdriver.support.ui import Select

    element = driver.find_element("id", "calc-" + key.replace("_", "-"))
    if element.tag_name == "select":
        Select(element).select_by_value(str(value))
    elif element.get_attribute("type") == "checkbox":
        if element.is_selected() != bool(value):
            element.click()
    else:
        element.clear()
        element.send_keys(str(value))


def _calculate_on_page(driver, inputs: dict) -> dict:
    """Set `inputs` through the form, wait until the page has computed them, return its state."""
    from selenium.webdriver.support.ui import WebDriverWait

    if "preset" in inputs:
        _set(driver, "preset", inputs["preset"])
    else:
        _set(driver, "preset", "custom")
        model = inputs["model"]
        for field_name in MODEL_FIELDS:
            _set(driver, field_name, model[field_name])
        _set(driver, "network", next(k for k, v in NETWORKS.items() if v["pos"] == model["pos"]))
    for field_name in CALCULATOR_FIELDS:
        if field_name in inputs:  # (no "reduce" under fp32: the page hides it)
            _set(driver, field_name, inputs[field_name])

    def computed(d):
        sent = d.execute_script("return document.getElementById('lmkit-calculator').dataset.inputs")
        return sent is not None and json.loads(sent) == inputs

    WebDriverWait(driver, 30, poll_frequency=0.1).until(computed)
    return driver.execute_script("""
        const root = document.getElementById('lmkit-calculator');
        const error = document.getElementById('calc-error');
        return {state: root.dataset.state, result: root.dataset.result, error: error.textContent,
                errorShown: !error.hidden && error.offsetParent !== null,
                outputs: [...root.querySelectorAll('[data-output]')].map(
                    e => [e.dataset.output, e.dataset.value, e.textContent]),
                bars: [...root.querySelectorAll('#calc-bar rect[id^="calc-bar-"]')].map(
                    e => [e.id, e.dataset.value])};
    """)


@pytest.mark.parametrize("case", list(CALCULATOR_CASES))
def test_calculator_shows_exactly_what_lmkit_costs_computes(calculator, case):
    inputs = CALCULATOR_CASES[case]
    expected = costs.calculate(json.loads(json.dumps(inputs)))
    assert expected["error"] is None, f"{case}: the test case itself is invalid: {expected['error']}"
    page = _calculate_on_page(calculator, inputs)
    assert page["state"] == "ready", f"{case}: the page shows an error: {page['error']}"
    assert not page["errorShown"]
    assert json.loads(page["result"]) == expected  # the raw result, every field
    wanted = _expected_outputs(expected)
    shown = {key: (value, text) for key, value, text in page["outputs"]}
    assert set(shown) == set(wanted), f"{case}: outputs {sorted(shown)} instead of {sorted(wanted)}"
    for key, value in wanted.items():
        raw, text = shown[key]
        if isinstance(value, bool):
            assert raw == str(value).lower(), (case, key, raw)
        elif isinstance(value, (int, float)):
            assert float(raw) == value, (case, key, raw, value)
        else:
            assert raw == value, (case, key, raw, value)
        assert text == _shown(key, value), f"{case}: {key} shows {text!r}, expected {_shown(key, value)!r}"
    bars = dict(page["bars"])
    for part in ("params", "grads", "optimizer", "activations"):
        assert float(bars[f"calc-bar-{part}"]) == expected["memory"][part], (case, part)


def test_calculator_covers_pipelines_and_a_typed_model():
    cases = CALCULATOR_CASES.values()
    assert len(CALCULATOR_CASES) >= 5
    assert {c["schedule"] for c in cases if c["pp"] > 1} >= {"gpipe", "1f1b", "interleaved"}
    assert any("model" in c for c in cases) and any(c["zero"] == 3 for c in cases)
    assert any(c["cp"] > 1 and costs.calculate(dict(c))["communication"]["cp"] > 0 for c in cases)
    assert all(costs.calculate(dict(c))["error"] is None for c in cases)
    # a typed model with the options of today's networks: grouped-query attention, SwiGLU, untied head
    typed = [c["model"] for c in cases if "model" in c]
    assert any(0 < m["n_kv_head"] < m["n_head"] and m["mlp"] == "swiglu" and not m["tie_embeddings"]
               for m in typed)
    assert all(set(m) == {*MODEL_FIELDS, *NETWORKS["gpt2"]} for m in typed)
    # both gradient dtypes of mixed precision, fp32 training, and selective recomputation's note
    assert {c.get("reduce") for c in cases} == {"fp32", "bf16", None}
    assert all(("reduce" in c) == (c["precision"] == "mixed") for c in cases)
    # experts: a preset and a typed model, expert parallelism inside dp and inside dp x cp, all-to-all bytes
    results = [costs.calculate(dict(c)) for c in cases if c["ep"] > 1]
    assert len(results) >= 2
    assert all(r["communication"]["ep"] > 0 < r["all_to_all_per_layer"] for r in results)
    assert any(c["ep"] > 1 and c["cp"] > 1 and "model" in c for c in cases)
    notes = {costs.calculate(dict(c))["notes"] for c in cases}
    assert notes == {"", costs.SELECTIVE_UNDER_FLASH}


def test_calculator_markup_offers_every_input_and_output():
    """The form (book/_ext/calculator.py) has a control for every field the page sends, an output row
    for every field it shows, recomputation "none" by default and selective marked as without effect
    under flash attention; the script sends the gradients' dtype under mixed precision only."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lmkit_calculator_ext", BOOK / "_ext" / "calculator.py")
    ext = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ext)
    html = ext.markup("llama3-8b")
    for field_name in (*CALCULATOR_FIELDS, *MODEL_FIELDS, "network", "preset"):
        key = field_name.replace("_", "-")
        assert f'id="calc-{key}"' in html, field_name
    result = costs.calculate(dict(CALCULATOR_CASES["llama2-7b tp8 zero1"]))
    shown = set(re.findall(r'data-output="([^"]+)"', html))
    assert shown == set(_expected_outputs(result)), sorted(shown ^ set(_expected_outputs(result)))
    label, options, default = ext.SELECTS["recompute"]
    assert default == "none" and dict(options)["selective"] == "selective (no effect with flash attention)"
    assert [v for v, _ in ext.SELECTS["reduce"][1]] == list(costs.REDUCE_DTYPES)
    assert ext.SELECTS["reduce"][2] == "fp32"
    script = (ext.STATIC / ext.SCRIPT).read_text(encoding="utf-8")
    assert 'if (inputs.precision === "mixed") inputs.reduce = $("reduce").value;' in script


def test_calculator_reports_an_impossible_layout_in_one_line(calculator):
    expected = costs.calculate(dict(CALCULATOR_IMPOSSIBLE))["error"]
    assert expected and "\n" not in expected
    page = _calculate_on_page(calculator, CALCULATOR_IMPOSSIBLE)
    assert page["state"] == "error" and page["errorShown"]
    assert page["error"] == expected
    assert json.loads(page["result"]) == {"error": expected}
    assert all(value == "" and text == "" for _, value, text in page["outputs"]), "stale results are shown"


def test_calculator_loads_python_only_when_started(site: Site, calculator, server):
    """Opening chapter 5 requests no Pyodide (megabytes a reader who never uses the calculator would
    download); its start button does."""
    from selenium.webdriver.support.ui import WebDriverWait

    browser = calculator
    browser.get(server + f"{CALCULATOR_PAGE}.html")
    resources = "return performance.getEntriesByType('resource').map(e => e.name)"
    WebDriverWait(browser, 30, poll_frequency=0.2).until(
        lambda d: d.execute_script("return document.readyState") == "complete")
    assert browser.execute_script(CALCULATOR_STATE) == "idle"
    assert not [u for u in browser.execute_script(resources) if "pyodide" in u], "Pyodide loaded on open"
    browser.find_element("id", "calc-start").click()
    WebDriverWait(browser, 120, poll_frequency=0.2).until(
        lambda d: d.execute_script(CALCULATOR_STATE) not in ("idle", "loading"))
    assert [u for u in browser.execute_script(resources) if "pyodide/pyodide.asm.wasm" in u]
    assert browser.execute_script(CALCULATOR_STATE) == "ready"


def test_calculator_runs_the_tested_costs_package_from_the_site(site: Site, calculator, server):
    served = site.html / "_static" / "lmkit" / "costs"
    modules = sorted(p.name for p in (ROOT / "lmkit" / "costs").glob("*.py"))
    assert json.loads((served / "files.json").read_text()) == modules, "the site lists other modules"
    for name in modules:
        assert (served / name).read_bytes() == (ROOT / "lmkit" / "costs" / name).read_bytes(), \
            f"the site serves another lmkit/costs/{name}"
    browser = _open_calculator(calculator, server, fresh=True)  # every request from the page's start
    _calculate_on_page(browser, CALCULATOR_CASES["llama2-7b tp8 zero1"])
    resources = "return performance.getEntriesByType('resource').map(e => e.name)"
    requests = set(browser.execute_script(resources))
    for entry in browser.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message.get("method") == "Network.requestWillBeSent":
            requests.add(message["params"]["request"]["url"])
    for needed in ("_static/pyodide/pyodide.mjs", "_static/pyodide/pyodide.asm.wasm",
                   "_static/pyodide/python_stdlib.zip", "_static/lmkit/costs/files.json",
                   *(f"_static/lmkit/costs/{name}" for name in modules), "_static/lmkit-calculator.mjs"):
        assert any(u.split("?")[0].endswith(needed) for u in requests), f"{needed} was not loaded"
    network = [u for u in requests if re.match(r"(?i)(https?|wss?|ftp):", u)]
    outside = sorted(u for u in network if not u.startswith(server))
    assert not outside, f"the calculator requested resources from outside the site: {outside}"
    console = [f"{e['level']}: {e['message'][:300]}" for e in browser.get_log("browser")
               if e["level"] == "SEVERE" and not BENIGN_CONSOLE.search(e["message"])]
    assert not console, "errors in the browser console:\n" + "\n".join(console)
    assert "Pyodide" in browser.find_element("id", "calc-status").text


@pytest.mark.parametrize("name", ["05_parallelism_theory", "06_hybrid_parallel_practice"])
def test_parallelism_chapters_show_their_figures_math_and_diagrams(pages, site: Site, name):
    """The generic checks above cover every page; here, what these two chapters must contain."""
    if name not in site.executed:
        pytest.skip(f"{name} is not executed in this build")
    report = pages(f"chapters/{name}")
    figures = sum(1 for img in report.images if img["output"] and img["complete"] and img["width"] > 0)
    assert figures >= 3, f"{name}: {figures} figures"
    if report.math_elements or name == "05_parallelism_theory":
        assert report.math_elements > 0 and report.mathjax == "typeset" and not report.math_unrendered
    if name == "05_parallelism_theory":  # the f/g operators of tensor parallelism
        assert report.diagrams >= 1 and all(svg["svg"] and svg["nodes"] >= 5 for svg in report.diagram_svgs)
