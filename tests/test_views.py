"""qk_lens.views: self-contained, escaped HTML that only formats finished numbers."""

import re
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
import torch

from qk_lens.views import Report, bar_list, pattern_heatmap, table

EVIL = "<script>alert(1)</script>"
VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source"}


class Doc(HTMLParser):
    """Collects elements (tag, attrs, text) and checks that every non-void tag is closed in order."""

    def __init__(self, text: str):
        super().__init__(convert_charrefs=True)
        self.elements: list[dict] = []
        self.stack: list[dict] = []
        self.errors: list[str] = []
        self.style_text = ""
        self.feed(text)
        self.close()
        self.errors += [f"unclosed <{e['tag']}>" for e in self.stack]

    def handle_starttag(self, tag, attrs):
        el = {"tag": tag, "attrs": dict(attrs), "text": ""}
        self.elements.append(el)
        if tag not in VOID:
            self.stack.append(el)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1]["tag"] != tag:
            self.errors.append(f"unexpected </{tag}>")
            return
        self.stack.pop()

    def handle_data(self, data):
        for el in self.stack:
            el["text"] += data
        if self.stack and self.stack[-1]["tag"] == "style":
            self.style_text += data

    def find(self, tag: str, cls: str | None = None) -> list[dict]:
        return [
            e
            for e in self.elements
            if e["tag"] == tag and (cls is None or cls in e["attrs"].get("class", "").split())
        ]


def external_refs(doc: Doc) -> list[str]:
    """Every way the document could reach the network."""
    found = []
    for el in doc.elements:
        for name, value in el["attrs"].items():
            value = (value or "").strip().lower()
            if name in {"src", "srcset", "data", "poster", "action"}:
                found.append(f"<{el['tag']} {name}={value}>")
            if name == "href" and not value.startswith("#"):
                found.append(f"<{el['tag']} href={value}>")
            if name == "style" and "url(" in value:
                found.append(f"<{el['tag']} style url(>")
        if el["tag"] in {"link", "iframe", "object", "embed", "img"}:
            found.append(f"<{el['tag']}>")
    style = doc.style_text.lower()
    found += [f"style {bad}" for bad in ("@import", "url(") if bad in style]
    return found


def rgb(style: str) -> tuple[int, ...]:
    match = re.search(r"background:rgb\((\d+),(\d+),(\d+)\)", style)
    assert match, style
    return tuple(int(x) for x in match.groups())


def causal_pattern(t: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    pattern = rng.random((t, t))
    pattern[np.triu_indices(t, 1)] = np.nan  # masked future keys arrive as NaN
    return pattern


def full_report() -> Report:
    tokens = ["<bos>", " a&b", EVIL, "\n", " end"]
    frame = pd.DataFrame({"part": ["x", EVIL, "a&b"], "term": [-1.5, 0.25, 3.0]})
    report = Report(f"Report {EVIL}")
    report.verdict(True, "terms sum to the score a&b")
    report.add("Pattern " + EVIL, pattern_heatmap(causal_pattern(5), tokens, title="L0H0"))
    report.add("Terms", table(frame, signed_columns=["term"], caption=EVIL))
    report.add("Bars", bar_list([(EVIL, -0.5), ("a&b", 1.0)], title="shares"))
    report.add_text("Notes", f"first {EVIL}\n\nsecond a&b")
    return report


# --------------------------------------------------------------------------- self-containment
def test_document_is_self_contained_and_balanced():
    text = full_report().to_html()
    assert text.lower().startswith("<!doctype html>")
    doc = Doc(text)
    assert doc.errors == []
    assert external_refs(doc) == []
    assert "http://" not in text and "https://" not in text
    assert not doc.find("script")
    assert [m["attrs"].get("charset") for m in doc.find("meta") if "charset" in m["attrs"]] == [
        "utf-8"
    ]
    assert len(doc.find("style")) == 1 and ".qkl" in doc.style_text
    for tag in ("table", "tr", "td"):
        assert doc.find(tag)


def test_checkers_catch_external_references_and_unbalanced_tags():
    # The helpers above must be able to fail, or the test above proves nothing.
    bad = Doc(
        '<html><head><link href="https://x/y.css"><style>@import url(https://x)</style></head>'
        '<body><img src="http://x/a.png"><table><tr><td>1</tr></table></body></html>'
    )
    refs = external_refs(bad)
    assert any("link" in r for r in refs) and any("src" in r for r in refs)
    assert "style @import" in refs and "style url(" in refs
    assert bad.errors


# --------------------------------------------------------------------------- escaping
def test_data_strings_are_escaped_everywhere():
    report = full_report()
    for text in (report.to_html(), report._repr_html_()):
        assert EVIL not in text and "<script" not in text
        assert "a&b" not in text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
        assert "a&amp;b" in text
        assert not Doc(text).find("script")
    heat = Doc(pattern_heatmap(np.eye(2), [EVIL, "a&b"]))
    header_text = [e["text"] for e in heat.find("th", "qh")]
    assert header_text == [f"q: {EVIL}", "q: a&b"]  # decoded text == the original tokens


# --------------------------------------------------------------------------- heatmap
def test_heatmap_cells_mask_highlight_and_intensity():
    t = 5
    pattern = causal_pattern(t)
    pattern[3, 0], pattern[3, 1] = 0.2, 0.8
    tokens = [f"t{i}" for i in range(t)]
    doc = Doc(pattern_heatmap(pattern, tokens, highlight=[(3, 1)]))
    assert doc.errors == []
    assert [e["text"] for e in doc.find("th", "qh")] == [f"q: {tok}" for tok in tokens]
    assert len(doc.find("th", "kh")) == t
    assert len(doc.find("tr")) == t + 1  # one header row
    cells = doc.find("td", "c")
    assert len(cells) == t * t
    grid = [cells[i * t : (i + 1) * t] for i in range(t)]
    for q in range(t):
        for k in range(t):
            cell = grid[q][k]
            if k > q:
                assert cell["text"] == "" and "m" in cell["attrs"]["class"].split()
                assert "background" not in cell["attrs"].get("style", "")
            else:
                assert cell["text"] == f"{pattern[q, k]:.2f}"
                assert f"{pattern[q, k]:.4f}" in cell["attrs"]["title"]
            assert ("outline" in cell["attrs"].get("style", "")) == ((q, k) == (3, 1))
    low, high = rgb(grid[3][0]["attrs"]["style"]), rgb(grid[3][1]["attrs"]["style"])
    assert sum(high) < sum(low) and high[0] < low[0]  # darker, less red: more blue
    assert high[2] > high[0]  # it is a blue
    assert rgb(pattern_heatmap(np.zeros((1, 1)), ["a"])) == (255, 255, 255)


def test_heatmap_accepts_tensors_and_rejects_bad_input():
    pattern = causal_pattern(4)
    tokens = list("abcd")
    assert pattern_heatmap(torch.tensor(pattern), tokens) == pattern_heatmap(pattern, tokens)
    with pytest.raises(ValueError, match="2-D"):
        pattern_heatmap(pattern[None], tokens)
    with pytest.raises(ValueError, match="tokens"):
        pattern_heatmap(pattern, tokens[:3])
    with pytest.raises(ValueError, match="highlight"):
        pattern_heatmap(pattern, tokens, highlight=[(0, 4)])


def test_wide_heatmap_is_compact_without_numbers():
    t = 40  # just past the numbered limit: structure checked with the parser
    doc = Doc(
        pattern_heatmap(causal_pattern(t), [f"t{i}" for i in range(t)], highlight=[(t - 1, 0)])
    )
    assert doc.errors == []
    assert "compact" in doc.find("table")[0]["attrs"]["class"].split()
    cells = doc.find("td", "c")
    assert len(cells) == t * t
    assert all(c["text"] == "" for c in cells)
    assert all(":" in c["attrs"]["title"] for c in cells)  # the value lives in the tooltip
    assert "outline" in cells[-t]["attrs"]["style"]
    # T = 256 still renders (string checks only: parsing 65k cells would dominate the test time).
    big = pattern_heatmap(causal_pattern(256), [f"t{i}" for i in range(256)])
    assert (
        big.count('<td class="c') == 256 * 256 and big.count("<tr>") == 256 + 1
    )  # + key header row


# --------------------------------------------------------------------------- table
def test_table_truncates_with_note():
    df = pd.DataFrame({"a": np.arange(60), "b": np.linspace(0, 1, 60)})
    doc = Doc(table(df, max_rows=50, title="T"))
    assert len(doc.find("tbody")[0]["text"]) > 0
    body_rows = [r for r in doc.find("tr") if r is not doc.find("tr")[0]]
    assert len(body_rows) == 50
    note = doc.find("div", "qkl-note")
    assert note and note[0]["text"].startswith("… 10 more rows")
    assert not Doc(table(df, max_rows=60)).find("div", "qkl-note")
    assert [e["text"] for e in doc.find("th")] == ["a", "b"]  # default RangeIndex hidden
    indexed = Doc(table(df.head(2).set_index("a")))
    assert [e["text"] for e in indexed.find("th")] == ["a", "b", "0", "1"]


def test_table_signed_columns_colour_by_sign_and_magnitude():
    df = pd.DataFrame({"name": ["n", "p", "small"], "term": [-2.0, 2.0, 0.5], "raw": [-1, 1, 2]})
    doc = Doc(table(df, signed_columns=["term"], float_format="{:.2f}"))
    cells = doc.find("td")
    assert [c["text"] for c in cells[:3]] == ["n", "-2.00", "-1"]
    neg, pos, small = (rgb(cells[i]["attrs"]["style"]) for i in (1, 4, 7))
    assert neg != pos
    assert neg[0] > neg[2] and pos[2] > pos[0]  # red vs blue
    assert sum(small) > sum(pos)  # 0.5 of max |2| is paler than 2
    assert all("style" not in cells[i]["attrs"] for i in (0, 2, 5, 8))  # unsigned: uncoloured
    with pytest.raises(KeyError):
        table(df, signed_columns=["nope"])


# --------------------------------------------------------------------------- bars
def test_bar_list_signed_bars():
    doc = Doc(bar_list([("neg", -1.0), ("pos", 0.5), ("zero", 0.0)], title="shares"))
    assert doc.errors == []
    rows = doc.find("tr")
    assert [r["text"] for r in doc.find("td", "lbl")] == ["neg", "pos", "zero"]
    assert [r["text"] for r in doc.find("td", "n")] == ["-1", "0.5", "0"]
    spans = [s["attrs"]["style"] for s in doc.find("span") if "height:100%" in s["attrs"]["style"]]
    assert len(spans) == 2 * len(rows)  # a left (negative) and right (positive) bar per row
    left_neg, right_neg, left_pos, right_pos = spans[:4]
    assert "width:100.0%" in left_neg and rgb(left_neg)[0] > rgb(left_neg)[2]
    assert "width:0" in right_neg and "width:0" in left_pos
    assert "width:50.0%" in right_pos and rgb(right_pos)[2] > rgb(right_pos)[0]
    assert "width:0" in spans[4] and "width:0" in spans[5]


# --------------------------------------------------------------------------- report
def test_report_save_round_trips(tmp_path):
    report = Report("My QK report").verdict(False, "attribution misses 12% of the score")
    report.add("One", "<p>frag</p>")
    path = report.save(tmp_path / "deep" / "dir" / "r.html")
    assert path == tmp_path / "deep" / "dir" / "r.html" and path.is_file()
    doc = Doc(path.read_text(encoding="utf-8"))
    assert doc.find("title")[0]["text"] == "My QK report"
    assert doc.find("h1")[0]["text"] == "My QK report"
    box = doc.find("div", "qkl-verdict")
    assert len(box) == 1 and "fail" in box[0]["attrs"]["class"]
    assert "attribution misses 12% of the score" in box[0]["text"]
    # The verdict sits above every section.
    assert doc.elements.index(box[0]) < doc.elements.index(doc.find("section")[0])


def test_report_sections_and_repr_html():
    report = Report("R")
    assert report.add("A", "<b>x</b>", "<i>y</i>") is report
    assert report.add_text("B", "p1 line\nstill p1\n\n  \np2") is report
    assert report.sections[0] == ("A", "<b>x</b><i>y</i>")
    frag = report._repr_html_()
    assert "<!doctype" not in frag.lower()
    doc = Doc(frag)
    assert doc.errors == []
    assert [h["text"] for h in doc.find("h2")] == ["A", "B"]
    assert "<b>x</b><i>y</i>" in frag
    assert [p["text"] for p in doc.find("p")] == ["p1 line\nstill p1", "p2"]
    assert len(doc.find("style")) == 1
    assert not doc.find("div", "qkl-verdict")


def test_qk_explorer_payload_and_bad_arguments():
    """The explorer's data: every pair above the threshold, each term as the table has it and
    its share of the score; the notebook fragment carries the same page without <html>."""
    import json

    from qk_lens import toy

    model = toy.load("attn2-ln", bridge=not toy.hooked_transformer_available())
    prompt = "owl cat jay fox owl cat jay fox"
    ex = model.qk_explorer(prompt, 1, heads=[0, 2], top_k=4, min_prob=0.1)
    data = ex.payload()
    table = ex.tables["upstream"]
    pairs = table.groupby(["head", "q_pos", "k_pos"]).ngroups
    assert len(data["cells"]["upstream"]) == pairs > 0 and data["heads"] == [0, 2]
    h, q, k, prob, score, rows, marginals = data["cells"]["dictionary"][0]
    # the row's query parts' q_a · k are the attribution's own query marginals
    parts = data["query_rows"]["dictionary"][f"{h},{q}"]
    assert len(marginals) == len(parts) + 1
    qm = model.qk_attribution(prompt, 1, h, q, k).query_marginals()
    for p, v in zip(parts, marginals, strict=False):
        feature = data["parts"][p][2]
        label = data["strings"][data["parts"][p][1]]
        hit = qm[(qm["feature"] == feature) & (qm["label"] == label)]
        assert len(hit) == 1 and float(hit["marginal"].iloc[0]) == pytest.approx(v, rel=1e-5)
    want = ex.tables["dictionary"].query("head == @h and q_pos == @q and k_pos == @k")
    assert len(rows) == len(want) == 5  # top 4 and the remainder
    for r in rows:
        w = want[want["rank"] == r[4]].iloc[0]
        assert data["strings"][data["parts"][r[0]][1]] == w["q_label"]
        assert r[2] == pytest.approx(w["term"], rel=1e-5)
        assert r[3] == pytest.approx(w["term"] / w["score"], rel=1e-5)
    assert sum(r[2] for r in rows) == pytest.approx(score, rel=1e-4)  # terms + remainder
    frag = ex._repr_html_()
    assert "<html" not in frag and "<script>" in frag
    blob = frag.split('<script type="application/json">')[1].split("</script>")[0]
    assert json.loads(blob)["tokens"] == ex.str_tokens
    with pytest.raises(ValueError, match="bases must be"):
        model.qk_explorer(prompt, 1, bases=["pca"])
    with pytest.raises(ValueError, match="head"):
        model.qk_explorer(prompt, 1, heads=[9])
