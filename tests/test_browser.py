"""The built web book, as a reader's browser shows it: every page in headless Chromium.

Needs the book in `_build/html` (`make test` builds it in smoke mode before pytest runs) and Debian's `chromium`
(`.ci/run` installs it when missing); without either the tests are skipped, with the reason.
"""
import json
import re
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from browser import Chromium, find_chromium

ROOT = Path(__file__).resolve().parent.parent
HTML = ROOT / "_build" / "html"
CHAPTERS = sorted((ROOT / "notebooks").glob("*.ipynb"))
PAGES = sorted(p for p in HTML.rglob("*.html") if "_static" not in p.parts and "_sources" not in p.parts)

pytestmark = [
    pytest.mark.skipif(not (HTML / "index.html").exists(), reason="no built book: run scripts/build_book.py --smoke"),
    pytest.mark.skipif(find_chromium() is None, reason="no chromium: `apt-get install chromium` (.ci/run does)"),
]


@pytest.fixture(scope="module")
def browser():
    with Chromium() as chromium:
        yield chromium


def open_page(browser, path: Path):
    return browser.open(path.resolve().as_uri())


def test_every_page_of_the_book_was_checked():
    """The book's own pages are all there, so the tests below cannot pass on an empty folder."""
    names = {p.relative_to(HTML).as_posix() for p in PAGES}
    expected = {f"notebooks/{c.stem}.html" for c in CHAPTERS} | {
        "book/intro.html", "book/reproduction.html", "book/teachers_guide.html", "book/glossary.html",
        "book/references.html"}
    assert expected <= names, expected - names


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.relative_to(HTML).as_posix())
def test_no_broken_image_or_link(browser, path):
    page = open_page(browser, path)
    broken_images = page.evaluate(
        "Array.from(document.images).filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src)")
    links = page.evaluate("Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
    page.close()
    assert not broken_images, broken_images
    local = [urlparse(link) for link in links if link.startswith("file://")]
    missing = sorted({unquote(url.path) for url in local if not Path(unquote(url.path)).exists()})
    assert not missing, missing


def figure_names(chapter: Path) -> list[str]:
    code = "".join("".join(c["source"]) for c in json.loads(chapter.read_text())["cells"] if c["cell_type"] == "code")
    return re.findall(r'plotting\.show\(name="([^"]+)"\)', code)


@pytest.mark.parametrize("chapter", CHAPTERS, ids=lambda p: p.stem)
def test_each_chapter_shows_its_figures_with_their_slide_exports(browser, chapter):
    names = figure_names(chapter)
    assert names, f"{chapter.name} saves no figure for slides"
    page = open_page(browser, HTML / "notebooks" / f"{chapter.stem}.html")
    images = page.evaluate("document.querySelectorAll('.cell_output img').length")
    exports = page.evaluate(
        "Array.from(document.querySelectorAll('.figure-export a')).map(a => a.getAttribute('href'))")
    overflowing = page.evaluate(
        "Array.from(document.querySelectorAll('.cell_input pre'))"
        ".filter(p => p.scrollWidth > p.clientWidth + 1).map(p => p.textContent.slice(0, 60))")
    page.close()
    assert images >= len(names), (images, names)
    assert sorted(exports) == sorted(f"figures/{n}.{ext}" for n in names for ext in ("png", "svg"))
    assert not overflowing, overflowing  # code that runs past the page's column scrolls sideways


VIEWER_STATE = """(() => {
  const s = document.getElementById('s'), cells = document.querySelectorAll('#g div');
  return {layer: document.getElementById('l').textContent, max: +s.max, cells: cells.length,
          words: Array.from(cells).map(c => c.textContent)};
})()"""
MOVE_TO_LAST = "(() => { const s = document.getElementById('s'); s.value = s.max; " \
               "s.dispatchEvent(new Event('input')); return s.value; })()"


VIEWERS = {"01_visual_token_localization": "logit_lens_viewer.html",
           "02_logitlens_vs_latentlens": "latentlens_viewer.html"}


@pytest.mark.parametrize("name", VIEWERS.values())
def test_the_standalone_viewers_draw_their_grid_and_follow_their_layer_slider(browser, name):
    page = open_page(browser, HTML / "notebooks" / name)
    before = page.evaluate(VIEWER_STATE)
    page.evaluate(MOVE_TO_LAST)
    after = page.evaluate(VIEWER_STATE)
    layer_words = page.evaluate("D[n.value][+s.value]")
    page.close()
    assert before["layer"] == "0" and before["cells"] > 0 and before["max"] > 0
    assert after["layer"] == str(before["max"]) and after["cells"] == before["cells"]
    assert after["words"] == layer_words  # the grid shows the last layer's words, not the first's


def test_the_lens_menu_switches_what_the_grid_shows(browser):
    page = open_page(browser, HTML / "notebooks" / VIEWERS["02_logitlens_vs_latentlens"])
    lenses = page.evaluate("Array.from(n.options).map(o => o.value)")
    shown = []
    for lens in lenses:
        page.evaluate(f"n.value = {json.dumps(lens)}; n.dispatchEvent(new Event('change')); true")
        shown.append((page.evaluate(VIEWER_STATE)["words"], page.evaluate("D[n.value][+s.value]")))
    page.close()
    assert len(lenses) == 3 and all(grid == data for grid, data in shown)


@pytest.mark.parametrize("chapter", VIEWERS, ids=str)
def test_the_chapters_embed_viewers_that_work_without_a_kernel(browser, chapter):
    page = open_page(browser, HTML / "notebooks" / f"{chapter}.html")
    frame = "document.querySelector('iframe.lens-viewer').contentWindow"
    cells = page.evaluate(f"{frame}.document.querySelectorAll('#g div').length")
    page.evaluate(f"{frame}.eval({json.dumps(MOVE_TO_LAST)})")
    layer = page.evaluate(f"{frame}.document.getElementById('l').textContent")
    top = page.evaluate(f"{frame}.document.getElementById('s').max")
    page.close()
    assert cells > 0 and layer == top != "0"


def test_the_reproduction_page_gathers_every_chapters_card(browser):
    """The cards are pasted from the executed chapters: one table per chapter 1-3, each row with a verdict."""
    page = open_page(browser, HTML / "book" / "reproduction.html")
    verdicts = page.evaluate("Array.from(document.querySelectorAll('table')).map(t => "
                             "Array.from(t.querySelectorAll('tbody tr')).map(r => r.lastElementChild.innerText))")
    page.close()
    assert len(verdicts) == 3 and all(verdicts), verdicts
    known = {"reproduced", "partly reproduced", "not reproduced", "opposite", "cannot tell"}
    assert {v.strip() for table in verdicts for v in table} <= known, verdicts
