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


# ---------------------------------------------------------------- the QK explorer
def js_fmt(x: float) -> str:
    """The explorer's number format (fmt in its script)."""
    if abs(x) >= 1000 or (abs(x) < 0.001 and x != 0):
        m, e = f"{x:.3e}".split("e")
        return f"{m}e{int(e):+d}"
    return f"{x:.4f}"


def click_cell(page, q: int, k: int, n_tokens: int, shift: bool = False) -> None:
    canvas = page.locator("canvas")
    box = canvas.bounding_box()
    px = (box["width"] - 2) / n_tokens  # inside its 1px border (position: from the padding box)
    modifiers = ["Shift"] if shift else []
    canvas.click(position={"x": (k + 0.5) * px, "y": (q + 0.5) * px}, modifiers=modifiers)


@pytest.mark.parametrize("bridge", [False, True], ids=["hooked", "bridge"])
def test_explorer_click_a_cell_reads_the_induction_story(browser, tmp_path, bridge) -> None:
    """From `qk-lens demo`'s model: open the explorer, pick the induction head, click its
    (query, key) cell and read "current token = X × previous token = X"; the numbers are the
    table's; hover shows the value; the other basis and a second key switch the panel."""
    from qk_lens import toy
    from qk_lens.toy import hooked_transformer_available

    if not bridge and not hooked_transformer_available():
        pytest.skip("HookedTransformer is stack (a)")
    model = toy.load("attn2-ln", bridge=bridge)
    prompt = "owl cat jay fox owl cat jay fox"
    ex = model.qk_explorer(prompt, 1, top_k=6, min_prob=0.05)
    path = ex.save(tmp_path / "explorer.html")
    page = Page(browser, path)
    page.page.wait_for_selector("[data-ready='1']")
    page.check_clean()
    T = len(ex.str_tokens)
    q, k = T - 1, 5  # "fox" reads the "owl" after the earlier "fox"
    page.page.locator(".heads button", has_text="L1H0").click()
    click_cell(page.page, q, k, T)
    want = ex.tables["dictionary"].query("head == 0 and q_pos == @q and k_pos == @k")
    want = want.sort_values("rank", key=lambda s: s.where(s >= 0, 10**9))
    rows = [
        [c.strip() for c in r.locator("td").all_inner_texts()]
        for r in page.page.locator(".detail table.terms tr").all()[1:]
    ]
    assert len(rows) == len(want) > 1
    for shown, (_, w) in zip(rows, want.iterrows(), strict=True):
        assert shown[1] == w["q_label"] and shown[2] == w["k_label"]
        assert shown[3] == js_fmt(float(f"{w['term']:.6g}")), (shown, w["term"])
    assert rows[0][1] == "current token = fox" and rows[0][2] == "previous token = fox"
    assert page.page.locator(".detail .score").inner_text() == js_fmt(
        float(f"{want['score'].iloc[0]:.6g}")
    )
    # hover: the pair's attention on the pattern, a term and its share in the matrix
    canvas = page.page.locator("canvas")
    box = canvas.bounding_box()
    px = (box["width"] - 2) / T
    page.page.mouse.move(box["x"] + 1 + (k + 0.5) * px, box["y"] + 1 + (q + 0.5) * px)
    tip = page.page.locator(".tip")
    assert "attention " + js_fmt(float(f"{want['prob'].iloc[0]:.6g}")) in tip.inner_text()
    page.page.locator(".detail .mcell").first.hover()
    assert "of the score" in tip.inner_text() and "term " in tip.inner_text()
    page.shot(f"explorer-{'bridge' if bridge else 'hooked'}")
    # the other basis: heads and embeddings instead of features
    page.page.locator(".bases button", has_text="upstream").click()
    up = page.page.locator(".detail table.terms").inner_text()
    assert "L0H" in up and "current token = fox" not in up
    # a second key of the same query: the exact contrast by query part, then both side by side
    page.page.locator(".bases button", has_text="dictionary").click()
    others = ex.tables["dictionary"].query("head == 0 and q_pos == @q and k_pos != @k")
    k2 = int(others.sort_values("prob").iloc[-1]["k_pos"])
    click_cell(page.page, q, k2, T, shift=True)
    assert page.page.locator(".detail .side > div").count() == 2
    assert "contrast of two keys" in page.page.locator(".detail").inner_text()
    a = model.qk_attribution(prompt, 1, 0, q, k)
    b = model.qk_attribution(prompt, 1, 0, q, k2)
    delta = float(page.page.locator(".detail .delta").inner_text())
    assert delta == pytest.approx(a.score - b.score, abs=2e-3)
    diffs = [
        float(t) for t in page.page.locator(".detail table.contrast td.diff").all_inner_texts()
    ]
    assert len(diffs) >= 2 and sum(diffs) == pytest.approx(delta, abs=2e-3)
    # the listed query parts' differences are the attributions' own (same query parts)
    qa, qb = a.query_marginals(), b.query_marginals()
    first = page.page.locator(".detail table.contrast tr").nth(1).locator("td").all_inner_texts()
    want = (
        qa[qa["label"] == first[0]]["marginal"].sum()
        - qb[qb["label"] == first[0]]["marginal"].sum()
    )
    assert float(first[3]) == pytest.approx(want, abs=2e-3)
    page.shot(f"explorer-contrast-{'bridge' if bridge else 'hooked'}")
    page.check_clean()


def test_explorer_at_512_tokens_and_12_heads(browser, tmp_path) -> None:
    """A page the size of a 512-token, 12-head layer (patterns and tables synthetic: the page
    does not care how they were computed) loads and answers clicks; file size and times go to
    the artefacts."""
    import json
    import time

    import numpy as np
    import pandas as pd

    from qk_lens.attribution.explorer import QKExplorer

    T, H, K = 512, 12, 8
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(H, T, T)) * 3
    logits[:, np.triu_indices(T, 1)[0], np.triu_indices(T, 1)[1]] = -np.inf
    pat = np.exp(logits - logits.max(-1, keepdims=True))
    pat /= pat.sum(-1, keepdims=True)
    h, q, k = np.nonzero(pat >= 0.05)
    n = len(h)
    rows = pd.DataFrame({
        "head": np.repeat(h, K + 1), "q_pos": np.repeat(q, K + 1), "k_pos": np.repeat(k, K + 1),
        "prob": np.repeat(pat[h, q, k], K + 1), "score": np.repeat(rng.normal(size=n) * 5, K + 1),
        "rank": np.tile(np.r_[np.arange(K), -1], n),
        "q_kind": "feature", "k_kind": "feature",
        "q_feature": rng.integers(0, 3000, n * (K + 1)), "k_feature": rng.integers(0, 3000, n * (K + 1)),
        "k_part_pos": np.repeat(k, K + 1),
        "q_label": "q feature", "k_label": "k feature",
        "term": rng.normal(size=n * (K + 1)),
    })  # fmt: skip
    rows["q_label"] = "q feature " + rows["q_feature"].astype(str)
    rows["k_label"] = "k feature " + rows["k_feature"].astype(str)
    ex = QKExplorer(11, list(range(H)), [f"t{i}" for i in range(T)], pat, {"dictionary": rows},
                    0.05, K, "512 tokens × 12 heads")  # fmt: skip
    path = ex.save(tmp_path / "big.html")
    size = path.stat().st_size
    t0 = time.perf_counter()
    page = Page(browser, path)
    page.page.wait_for_selector("[data-ready='1']")
    load_s = time.perf_counter() - t0
    page.check_clean()
    page.page.locator(".heads button", has_text="L11H7").click()
    sel = np.nonzero((h == 7) & (q > 200) & (q < 300))[0][0]  # a cell inside the viewport
    hq, hk = int(q[sel]), int(k[sel])
    t0 = time.perf_counter()
    click_cell(page.page, hq, hk, T)
    page.page.wait_for_selector(".detail table.terms")
    click_s = time.perf_counter() - t0
    assert page.page.locator(".detail table.terms tr").count() == K + 2  # header, K, remainder
    page.shot("explorer-512x12")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "explorer-512x12.json").write_text(json.dumps(
        {"pairs": int(n), "file_mib": size / 2**20, "load_s": load_s, "click_s": click_s}
    ))  # fmt: skip
    assert load_s < 30 and click_s < 10  # usable; the measured figures are in the README


def test_graph_view_click_an_edge_shows_its_heads_and_why(browser, tmp_path) -> None:
    """A transcoder graph's view: clicking its strongest link across positions shows that
    edge's weight and head loadings (the Python numbers) and the QK attribution of its top
    head; clicking a node lists its incoming links."""
    import torch

    from tests.test_transcoders import model_of, random_transcoders

    model, _, _ = model_of("GPT2LMHeadModel", torch.float64)
    model.add_transcoders(random_transcoders(model.cfg.d_model, 3, torch.float64, "clt", d_tc=24))
    tokens = torch.tensor([3, 17, 42, 5, 17, 42, 5, 17])
    g = model.transcoder_graph(tokens, max_n_logits=2)
    hl = model.transcoder_loadings(g)
    view = hl.view(max_links=400, qk_edges=5)
    path = view.save(tmp_path / "graph.html")
    page = Page(browser, path)
    page.page.wait_for_selector("[data-ready='1']")
    page.check_clean()
    links = view.payload()["links"]
    i = next(j for j, link in enumerate(links) if link[7] >= 0)  # strongest link with QK terms
    page.page.evaluate(
        "i => document.querySelector(`line.hit[data-link='${i}']`)"
        ".dispatchEvent(new MouseEvent('click', {bubbles: true}))", i
    )  # fmt: skip
    detail = page.page.locator(".detail")
    e = g.edge_index((g.nodes["node_id"][links[i][0]], g.nodes["node_id"][links[i][1]]))
    assert detail.locator(".weight").inner_text() == js_fmt(float(f"{float(g.edge_weight[e]):.6g}"))
    top = hl.top_heads(e, 5)
    rows = [[c.strip() for c in r.locator("td").all_inner_texts()]
            for r in detail.locator("table.heads tr").all()[1:]]  # fmt: skip
    assert len(rows) >= 1
    assert rows[0][:2] == [str(top["layer"][0]), str(top["head"][0])]
    assert rows[0][2] == js_fmt(float(f"{top['loading'][0]:.6g}"))
    attr = hl.qk_attribution(e)
    assert f"why L{attr.layer}H{attr.head} attends from {attr.q_pos}" in detail.inner_text()
    first = attr.top(1).iloc[0]
    assert first["q_label"] in detail.locator("table.qkterms").inner_text()
    page.shot("graph-view")
    page.page.locator("circle").nth(links[i][1]).dispatch_event("click")
    assert "incoming links shown" in detail.inner_text()
    page.check_clean()


def test_from_the_demo_to_the_induction_cell(browser, tmp_path, capsys) -> None:
    """A newcomer's path: `qk-lens demo` prints where its explorer is and which cell to click;
    clicking it there reads "current token = wolf × previous token = wolf"."""
    import re

    from qk_lens.cli import main

    assert main(["demo", "--out", str(tmp_path / "demo.html")]) == 0
    out = capsys.readouterr().out
    m = re.search(
        r"explorer: (\S+) \(click L(\d+)H(\d+), then the cell at query (\d+), key (\d+)\)", out
    )
    assert m, out[-500:]
    path, layer, head, q, k = m.group(1), *map(int, m.groups()[1:])
    page = Page(browser, Path(path))
    page.page.wait_for_selector("[data-ready='1']")
    page.page.locator(".heads button", has_text=f"L{layer}H{head}").click()
    T = page.page.evaluate(
        "() => JSON.parse(document.querySelector('script[type=\"application/json\"]')"
        ".textContent).tokens.length"
    )
    click_cell(page.page, q, k, T)
    first = [
        c.strip()
        for c in page.page.locator(".detail table.terms tr").nth(1).locator("td").all_inner_texts()
    ]
    assert first[1:3] == ["current token = wolf", "previous token = wolf"], first
    page.check_clean()


def test_figures_plot_the_results_numbers(browser, tmp_path) -> None:
    """The plotly figures (atlas scores, a steering sweep with predicted vs measured scores, a
    contrast) as offline files: they load with no console error and no request, and the plotted
    numbers are the results'."""
    import numpy as np

    from qk_lens import toy

    model = toy.load("attn2-ln", bridge=not toy.hooked_transformer_available())
    prompt = "owl cat jay fox elk hen owl cat jay fox elk"
    attr = model.qk_attribution(prompt, 1, 0, q_pos=11, k_pos=6)
    feature = int(attr.top(top_k=1)["k_feature"].iloc[0])
    sweep = model.steer_qk_sweep(prompt, 1, 0, feature, scales=[-1, 0, 0.5, 1, 2],
                                 positions=[6], target=(11, 6))  # fmt: skip
    frame = sweep.frame()
    figures = {
        "figure-sweep": (sweep.figure(), [frame["L1H0 score"], frame["L1H0 predicted score"]]),
        "figure-contrast": (attr.contrast(1).figure(top_k=6), None),
        "figure-atlas": (model.head_atlas().figure(), None),
    }
    for name, (fig, want) in figures.items():
        path = tmp_path / f"{name}.html"
        fig.write_html(str(path), include_plotlyjs=True, full_html=True)
        page = Page(browser, path)
        page.page.wait_for_selector(".plotly-graph-div .main-svg")
        page.check_clean()
        data = page.page.evaluate(
            "() => document.querySelector('.plotly-graph-div').data.map(t => t.y || t.z)"
        )
        if want is not None:
            for got, w in zip(data, want, strict=False):
                np.testing.assert_allclose(np.asarray(got, dtype=float), w.to_numpy(), rtol=1e-12)
        page.shot(name)
    # measured and predicted agree wherever the sweep's check holds
    assert sweep.check() < 1e-4
    np.testing.assert_allclose(frame["L1H0 score"], frame["L1H0 predicted score"], atol=1e-4)
