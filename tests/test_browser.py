"""The HTML views in a real browser: Playwright driving the system Chromium (Debian's package,
installed by .ci/run; no browser download). Each page loads offline with no console error and
no request leaving the file, and the numbers in its DOM are the Python results. Screenshots go
to ``test-artifacts/`` (or ``$QK_LENS_ARTIFACTS``).

Where Chromium or Playwright is missing the tests skip, unless ``QK_LENS_REQUIRE_BROWSER=1``
(CI sets it), where they fail.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("QK_LENS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("QK_LENS_ARTIFACTS", ROOT / "test-artifacts"))
# As root, on a closed network: no sandbox, and none of Chromium's own background connections.
FLAGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "playwright is not installed (pip install playwright)"
    if missing is None and not Path(CHROMIUM).is_file():
        missing = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
    if missing is not None:
        if os.environ.get("QK_LENS_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


class Page:
    """A page opened from a file, with its console errors and outside requests recorded."""

    def __init__(self, browser, path: Path) -> None:
        self.page = browser.new_page(viewport={"width": 1280, "height": 900})
        self.errors: list[str] = []
        self.outside: list[str] = []
        self.page.on("console", lambda m: m.type == "error" and self.errors.append(m.text))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

        def route(r):
            if r.request.url.startswith(("file:", "data:")):
                return r.continue_()
            self.outside.append(r.request.url)
            return r.abort()

        self.page.route("**/*", route)
        self.page.goto(path.resolve().as_uri())
        self.page.wait_for_load_state("load")

    def check_clean(self) -> None:
        assert self.errors == [], f"console errors: {self.errors}"
        assert self.outside == [], f"requests leaving the file: {self.outside}"

    def section(self, heading: str):
        return self.page.locator("section", has=self.page.locator("h2", has_text=heading))

    def shot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        assert path.stat().st_size > 10_000  # a rendered page, not a blank one
        return path


def cells(table) -> list[list[str]]:
    return [
        [c.strip() for c in row.locator("td").all_inner_texts()]
        for row in table.locator("tbody tr").all()
    ]


def close(shown: str, value: float) -> bool:
    """``shown`` is ``value`` printed with 4 significant digits (the views' format)."""
    return shown == f"{value:.4g}"


@pytest.fixture(scope="module")
def story():
    from qk_lens import toy
    from qk_lens.demo import run_story

    return run_story(toy.load("attn2-ln"))


def test_demo_report_shows_the_story_numbers(browser, story, tmp_path) -> None:
    path = story.report().save(tmp_path / "demo.html")
    page = Page(browser, path)
    page.check_clean()
    tables = page.section("top query-feature × key-feature terms").locator("table")
    rows = cells(tables.first)  # then the coverage table
    top = story.top().reset_index(drop=True)
    assert len(rows) == len(top) > 0
    for shown, (_, want) in zip(rows, top.iterrows(), strict=True):
        assert shown[0] == want["q_label"] and shown[1] == want["k_label"]
        assert close(shown[2], want["term"]), (shown, want["term"])
    caption = page.section("top query-feature × key-feature terms").inner_text()
    assert f"score {story.attribution.score:.4f}" in caption
    # every check's verdict is on the page
    text = page.page.inner_text("body")
    for check in story.checks:
        assert check.name in text
    page.shot("demo_report")


def test_atlas_grid_names_every_head_with_its_labels(browser, story, tmp_path) -> None:
    atlas = story.atlas
    path = atlas.save(tmp_path / "atlas.html")
    page = Page(browser, path)
    page.check_clean()
    grid = page.section("Labels").first.locator("td[title]")
    texts = grid.all_inner_texts()
    assert len(texts) == len(atlas.frame)
    for row, text in zip(atlas.frame.itertuples(), texts, strict=True):
        assert text.startswith(row.name)
        for label in row.labels:
            assert label in text
    # hovering a cell shows its evidence (the title tooltip holds it)
    first = grid.first
    first.hover()
    assert atlas.frame.iloc[0]["name"] in first.inner_text()
    assert first.get_attribute("title")
    page.shot("atlas_report")


def test_qk_profile_report_counts(browser, tmp_path) -> None:
    from qk_lens.batch import parse_config, qk_profile, run

    cfg = parse_config(
        {
            "name": "browser",
            "model": {"name": "attn2-ln"},
            "prompts": {"texts": ["owl cat jay fox owl cat jay fox", "bee owl cat bee owl cat"]},
            "compute": {"table": {"layers": [1], "top_k": 4, "min_prob": 0.3}},
            "output": {"dir": str(tmp_path / "run")},
            "executor": {"workers": 0},
        }
    )
    run(cfg, progress=False)
    profile = qk_profile(tmp_path / "run")
    page = Page(browser, tmp_path / "run" / "report.html")
    page.check_clean()
    shown = page.section("L1H0 (")
    rows = cells(shown.locator("table"))
    want = profile.head(1, 0, top_k=10)
    assert len(rows) == len(want)
    for r, (_, w) in zip(rows, want.iterrows(), strict=True):
        assert (r[0], int(r[1]), r[2], int(r[3])) == (
            w["q_label"],
            w["q_feature"],
            w["k_label"],
            w["k_feature"],
        )
        assert int(r[4]) == w["count"]
        assert close(r[7], w["mean_term"])
    page.shot("qk_profile_report")
