"""The paper's case studies, replayed end to end on the bundled casebook model.

For one case (``CASES``: induction, antonyms, multiple-choice, correctness, arithmetic) on a
held-out prompt, :func:`run_case` walks the method and checks each step against the mechanism
the grammar requires (docs/casebook.md):

1. the model answers the held-out prompt;
2. in the transcoder attribution graph from the answer's logit, the edge across positions that
   matters most to the answer (what single heads carry of it, times its target's influence on
   the logit) comes from the answer's evidence (the name, the word asked about, the right
   option's span; a check's stated value or what it is checked against);
3. the head loadings of that edge name the heads that carried it, and those heads attend there;
4. the QK attribution of the top head at (q = the edge's target, k = its source), in the
   layer's SAE basis, gives the top query-feature × key-feature pair (one whose key feature
   raises the score); its labels are checked against what the key and the query are;
5. QK-only steering of that pair in those heads (the key feature scaled at the source, every
   other head's pattern frozen: the hydra control) flips the answer, on this prompt and on 50
   held-out prompts, each traced on its own (:func:`trace`: its own edge, heads and pair); for
   correctness and arithmetic, as in the paper, the prompt and the 50 are true statements
   (Yes -> No), and 50 false ones (No -> Yes) are reported beside them;
6. correctness and arithmetic: the heads whose attention separates true from false statements,
   with their W_QK eigenvalue skew from the head atlas, read at two places: from "?" to the
   stated value, and (the paper's) from the stated value to the object or second operand;
7. induction: when two names share the title, how much of the final title's preference for the
   more recent one is positional (:func:`recency_split`), at the head that attends most from the
   final title to the two names (:func:`name_head`).

Steps 1–5 are checks (the demo's exit status); the skew and the positional share are reported
as found, with a note where they differ from the paper's account.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from qk_lens.checks import check_count
from qk_lens.demo import Check
from qk_lens.toy.casebook_corpus import CASES, WORD_CLASSES, Item, held_out_items
from qk_lens.views import Report, bar_list, pattern_heatmap, table

__all__ = [
    "BY_ANSWER_CASES",
    "CARRY_SHARE",
    "CASES",
    "CaseStudy",
    "FLIP_ANSWER",
    "NothingToSteer",
    "REVERSE_ANSWER",
    "RecencySplit",
    "SEPARATING_AT",
    "SEPARATION_MIN",
    "Trace",
    "carrying_heads",
    "evidence_positions",
    "flip_items",
    "flip_rate",
    "name_head",
    "recency_split",
    "run_case",
    "separating_heads",
    "separating_where",
    "trace",
]

# the key feature's coefficient at the source is multiplied by this inside the steered heads: it
# turns the pair's term around; at -4 the casebook's layer-0 heads kept a third of their attention
# on the word asked about (docs/casebook.md §5)
STEER_SCALE = -10.0
FLIP_MIN = 0.8  # the share of held-out prompts steering must flip
# the steered heads: the top head's layer's heads that carry the edge with it, largest first,
# until they hold this share of the layer's loading of that sign
CARRY_SHARE = 0.9
ATTENTION_MIN = 0.3  # a head that carries the edge attends at least this much to the source
N_FLIP = 50
# cases whose answers are a few words, so the flips are also shown per answer
BY_ANSWER_CASES = ("multiple-choice",)
# The checks' flips are counted where the paper counted them: on true statements, Yes -> No (its
# prompts "the color of a banana is yellow ?" and "18 + 5 = 23 ?"). A false statement's
# No -> Yes is measured on as many false ones and reported beside it, not checked: the study's
# edit removes attention to evidence, and no token of "2 + 6 = 5 ?" is the right sum (the
# paper, too, needed larger steering, and a query-side injection, for No -> Yes).
FLIP_ANSWER = {"correctness": "yes", "arithmetic": "yes"}
REVERSE_ANSWER = {"correctness": "no", "arithmetic": "no"}
# a W_QK skew counts as clearly signed from here (random heads spread about 0.1: qk_lens.atlas)
SKEW_CLEAR = 0.2


class NothingToSteer(ValueError):
    """A prompt whose graph has no edge across positions that heads carry toward the answer, or
    whose top head has no query × key feature pair to steer."""


def _source(item: Item) -> int:
    return item.marks["source"] + 1  # BOS comes first


def _checked(item: Item) -> int:
    """The prompt position of what a check's stated value is checked against: the object of a
    color check, the second operand of a sum."""
    return item.marks["object" if item.case == "correctness" else "operand"] + 1


def evidence_positions(item: Item) -> list[int]:
    """The prompt positions (BOS = 0) that hold the answer's evidence: the name, the word; for
    multiple choice the paper's span of the right option, from its content to the beginning of
    the next option's content (its "(", letter and ")"); for a check, the statement's two sides:
    the stated value and what it is checked against (the object, the second operand: where the
    paper's concordance heads attend from the stated value)."""
    src = _source(item)
    if item.case in ("correctness", "arithmetic"):
        return sorted((_checked(item), src))
    if item.case != "multiple-choice":
        return [src]
    options = sorted(p + 1 for key, p in item.marks.items() if key.startswith("option"))
    later = [p for p in options if p > src]
    return list(range(src, later[0])) if later else [src]


def _labels_for(item: Item, pos: int, roles: list[str | None]) -> set[str]:
    """Labels that describe the token at ``pos`` (prompt position, BOS = 0) by its content (the
    token, its class of words, the token before it) or its role: a ``position = p`` feature
    describes where it is, not what it is."""
    words = ("<bos>", *item.words[:-1])
    out = {f"current token = {words[pos]}"}
    # a word in several classes belongs to the first, as in the labels (qk_lens.labels)
    cls = next((c for c, ws in WORD_CLASSES.items() if words[pos] in ws), None)
    if cls is not None:
        out.add(f"token class = {cls}")
    if pos > 0:
        out.add(f"previous token = {words[pos - 1]}")
        role = roles[pos - 1]
        if role is not None:
            out.add(f"role = {role}")
    return out


@dataclass
class RecencySplit:
    """Why the final title prefers the more recent of two names with that title, at one head.

    Per prompt: Δ = s(q, recent) − s(q, older); Δ_swapped the same with the two names exchanged
    (same positions, contents swapped). The part of Δ that survives the swap is positional,
    the part that flips with it is content: ``positional = (Δ + Δ_swapped) / 2``,
    ``content = (Δ − Δ_swapped) / 2`` (they sum to Δ exactly). ``direct`` splits Δ exactly by
    the key side's upstream parts (embeddings, positions, heads, MLPs, biases).
    """

    layer: int
    head: int
    frame: pd.DataFrame  # one row per prompt
    direct: pd.DataFrame  # key-side upstream parts of Δ, summed over prompts

    @property
    def positional_share(self) -> float:
        f = self.frame
        return float(f["positional"].sum() / f["delta"].sum())

    def summary(self) -> str:
        f = self.frame
        top = self.direct.head(4)
        parts = ", ".join(f"{r.label} {r.share:+.0%}" for r in top.itertuples())
        return (
            f"L{self.layer}H{self.head} on {len(f)} prompts with two names under one title: "
            f"mean Δ score (recent − older) {f['delta'].mean():+.2f}, of which positional "
            f"{f['positional'].mean():+.2f} ({self.positional_share:.0%}) and content "
            f"{f['content'].mean():+.2f}; attention to the recent name "
            f"{f['p_recent'].mean():.2f} vs the older {f['p_older'].mean():.2f}. Direct key-side "
            f"parts of Δ: {parts}"
        )


@dataclass
class Trace:
    """Steps 2–4 on one prompt: the edge across positions that matters most to the answer, the
    heads that carry it, why the top head attends there, and the pair to steer."""

    graph: Any
    loadings: Any
    edge: int
    edge_info: dict[str, Any]
    heads: pd.DataFrame  # the edge's top heads
    layer: int
    head: int
    steer_heads: list[int]  # the top head's layer's heads that carry the edge (carrying_heads)
    q_pos: int
    k_pos: int
    attribution: Any  # QKAttribution of the top head at (q_pos, k_pos), the layer's SAE basis
    pair: dict[str, Any]  # the top query × key feature pair


@dataclass
class CaseStudy:
    """One case on one prompt, step by step, with the checks; ``report()`` renders it. The
    traced steps 2–4 are its :class:`Trace` (``trace``; ``graph``, ``layer``, ``pair``, … read
    from it)."""

    case: str
    model_name: str
    item: Item
    str_tokens: list[str]
    prediction: str
    trace: Trace
    pattern: np.ndarray  # the top head's pattern on the prompt
    steering: Any  # QKSteering with the hydra control
    steering_free: Any  # the same edit, other heads' patterns free
    flips: pd.DataFrame  # held-out prompts: before, after, flipped
    # correctness, arithmetic: the same on held-out false statements (No -> Yes), reported
    reverse_flips: pd.DataFrame | None = None
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    separating: pd.DataFrame | None = None  # correctness, arithmetic
    recency: RecencySplit | None = None  # induction

    graph = property(lambda self: self.trace.graph)
    loadings = property(lambda self: self.trace.loadings)
    edge = property(lambda self: self.trace.edge)
    edge_info = property(lambda self: self.trace.edge_info)
    heads = property(lambda self: self.trace.heads)
    layer = property(lambda self: self.trace.layer)
    head = property(lambda self: self.trace.head)
    steer_heads = property(lambda self: self.trace.steer_heads)
    q_pos = property(lambda self: self.trace.q_pos)
    k_pos = property(lambda self: self.trace.k_pos)
    attribution = property(lambda self: self.trace.attribution)
    pair = property(lambda self: self.trace.pair)

    @property
    def confirmed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def flip_rate(self) -> float:
        ok = self.flips[self.flips["answered"]]
        return float(ok["flipped"].mean()) if len(ok) else float("nan")

    def flips_by_answer(self) -> pd.DataFrame:
        """The held-out flips split by the right answer (one row each: prompts, answered,
        flipped, rate): a check's Yes -> No and No -> Yes differ (the paper flipped Yes -> No;
        No -> Yes took larger steering), as do the options of a multiple-choice question."""
        f = self.flips
        out = f.groupby("answer", sort=True).agg(
            prompts=("answered", "size"), answered=("answered", "sum"), flipped=("flipped", "sum")
        )
        out["rate"] = out["flipped"] / out["answered"].where(out["answered"] > 0)
        return out.reset_index()

    def summary(self) -> str:
        """Plain-text account for a terminal."""
        e = self.edge_info
        lines = [
            f"model: {self.model_name}   case: {self.case}",
            f"prompt: {self.item.prompt}",
            f"answer: {self.item.answer!r}   model's top prediction: {self.prediction!r}",
            "",
            f"graph: {self.graph}",
            f"edge across positions: {e['source_label']!r} at {e['source_pos']} "
            f"({self.str_tokens[e['source_pos']]!r}) -> {e['target_label']!r} at "
            f"{e['target_pos']} ({self.str_tokens[e['target_pos']]!r}), weight "
            f"{e['weight']:+.3f}",
            "heads carrying it (loading, share of the edge):",
        ]
        for r in self.heads.itertuples():
            lines.append(f"  L{r.layer}H{r.head}  {r.loading:+.3f}  ({r.share:+.0%})")
        p = self.pair
        lines += [
            "",
            f"why L{self.layer}H{self.head} attends from {self.q_pos} to {self.k_pos} "
            f"(prob {self.pattern[self.q_pos, self.k_pos]:.2f}, score "
            f"{self.attribution.score:+.3f}); top terms:",
        ]
        for _, r in self.attribution.top(5).iterrows():
            lines.append(
                f"  {r['q_label'] or r['q_kind']:<40} x {r['k_label'] or r['k_kind']:<40} "
                f"{r['term']:+8.3f} ({r['share']:+.0%})"
            )
        s = self.steering.summary()
        lines += [
            "",
            f"steering: key feature {p['k_feature']} ({p['k_label']!r}) x {STEER_SCALE:g} at "
            f"position {self.k_pos} in L{self.layer} heads {self.steer_heads}, other heads' "
            f"patterns frozen: top prediction {s['top_before']!r} -> {s['top_after']!r}; "
            f"without the control: -> {self.steering_free.summary()['top_after']!r}",
            f"held-out {'true statements' if self.case in FLIP_ANSWER else 'prompts'} "
            f"flipped: {self.flips['flipped'].sum()} of "
            f"{int(self.flips['answered'].sum())} answered ({self.flip_rate:.0%}; "
            f"needs >= {FLIP_MIN:.0%})",
        ]
        if self.reverse_flips is not None:
            r = self.reverse_flips
            n_ok = int(r["answered"].sum())
            lines.append(
                f"  those are true statements ({FLIP_ANSWER[self.case]!r}), flipped as the paper "
                f"did; on {len(r)} held-out false statements ({REVERSE_ANSWER[self.case]!r}) the "
                f"same edit flips {int(r['flipped'].sum())} of {n_ok} answered (reported, not "
                "checked)"
            )
        if self.case in BY_ANSWER_CASES:
            split = "; ".join(
                f"{r.answer!r} {r.flipped} of {r.answered}"
                for r in self.flips_by_answer().itertuples()
            )
            lines.append(f"  by the right answer (flipped of answered): {split}")
        if self.separating is not None:
            for at, sep in self.separating.groupby("at", sort=False):
                lines += ["", f"heads whose attention {separating_where(self.case, at)} "
                              "separates true from false statements:"]  # fmt: skip
                for r in sep.head(3).itertuples():
                    lines.append(
                        f"  L{r.layer}H{r.head}  attention true {r.attn_true:.2f} / false "
                        f"{r.attn_false:.2f}  ({r.kind})  W_QK skew {r.qk_skew:+.2f}"
                    )
        if self.recency is not None:
            lines += ["", "recency (two names, one title): " + self.recency.summary()]
        lines += ["", "checks:"]
        lines += [f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        if self.notes:
            lines += ["", "notes:"] + [f"  {n}" for n in self.notes]
        lines += ["", self.verdict()]
        return "\n".join(lines)

    def verdict(self) -> str:
        if self.confirmed:
            what = "true statements" if self.case in FLIP_ANSWER else "answers"
            return (
                f"Confirmed: the {self.case} case runs end to end; steering flips "
                f"{self.flip_rate:.0%} of held-out {what}."
            )
        failed = "; ".join(f"{c.name}: {c.detail}" for c in self.checks if not c.ok)
        return f"Not confirmed. {failed}"

    def report(self) -> Report:
        """A self-contained HTML report of every step."""
        rep = Report(f"qk_lens casebook: {self.case} on {self.model_name}")
        rep.verdict(self.confirmed, self.verdict())
        rep.add("Checks", table(pd.DataFrame([c.__dict__ for c in self.checks]), max_rows=20))
        e = self.edge_info
        rep.add(
            "The edge across positions and the heads that carried it",
            table(pd.DataFrame([e])),
            table(self.heads, signed_columns=["loading", "share"]),
        )
        rep.add(
            f"L{self.layer}H{self.head}: attention pattern",
            pattern_heatmap(
                self.pattern,
                self.str_tokens,
                highlight=[(self.q_pos, self.k_pos)],
                caption=f"outlined: query {self.q_pos} → key {self.k_pos}",
            ),
        )
        cols = ["q_label", "k_label", "term", "share", "q_activation", "k_activation"]
        rep.add(
            f"Why L{self.layer}H{self.head} attends there: top query × key terms",
            table(
                self.attribution.top(10)[cols],
                signed_columns=["term", "share"],
                caption=f"score {self.attribution.score:.4f}; terms sum to it exactly",
            ),
        )
        rep.add(
            "QK-only steering of the top pair",
            table(self.steering.predictions(5), caption="with the hydra control"),
            *(
                [table(self.flips_by_answer(), caption="held-out flips by the right answer")]
                if self.case in BY_ANSWER_CASES
                else []
            ),
            table(self.flips, max_rows=60, caption="held-out prompts"),
        )
        if self.reverse_flips is not None:
            rep.add(
                "The same steering on false statements (reported, not checked)",
                table(self.reverse_flips, max_rows=60, caption="held-out false statements"),
            )
        if self.separating is not None:
            rep.add("Heads that separate true from false", table(self.separating, max_rows=40))
        if self.recency is not None:
            rep.add(
                "Recency: positional vs content",
                table(self.recency.frame, max_rows=60, caption=self.recency.summary()),
                bar_list(
                    list(
                        zip(self.recency.direct["label"], self.recency.direct["delta"], strict=True)
                    ),
                    caption="key-side upstream parts of Δ (sum over prompts)",
                ),
            )
        if self.notes:
            rep.add("Notes", table(pd.DataFrame({"note": self.notes})))
        return rep


# ---------------------------------------------------------------------------------------------
# the steps
# ---------------------------------------------------------------------------------------------


def _top_token(model: Any, prompt: str) -> str:
    with torch.no_grad():
        logits = model(prompt)[0, -1]
    return model.tokenizer.decode([int(logits.argmax())])


def _choose_item(model: Any, case: str, seed: int) -> Item:
    """The first held-out item the model answers (for induction: with two names under the
    final title, so recency matters; for a check: a true statement, the paper's prompt)."""
    for item in held_out_items(case, 200, seed=seed):
        if case == "induction" and item.foil is None:
            continue
        if case in FLIP_ANSWER and item.answer != FLIP_ANSWER[case]:
            continue
        if _top_token(model, item.prompt) == item.answer:
            return item
    raise ValueError(f"the model answers none of 200 held-out {case} prompts")


def _cross_edge(graph: Any, loadings: Any) -> int:
    """The edge across positions that matters most to the answer: by the share of its target's
    input that single heads carry (|Σ head loadings| / Σ|weights into the target|) times the
    target's reach to the answer's logit (its influence, plus its own logit weight), as
    circuit-tracer scores edges for pruning."""
    ed = graph.edges
    nodes = graph.nodes
    tgt = ed["target_index"].to_numpy()
    carried = np.abs(loadings.heads.sum((1, 2)).double().numpy())
    into = np.bincount(tgt, weights=np.abs(ed["weight"].to_numpy()), minlength=len(nodes))
    reach = (nodes["influence"].to_numpy() + nodes["weight"].to_numpy())[tgt]
    score = carried / np.maximum(into[tgt], 1e-12) * reach
    cross = ed["source_pos"].to_numpy() < ed["target_pos"].to_numpy()
    ok = cross & np.isfinite(score) & (score > 0)
    if not ok.any():
        raise NothingToSteer(
            f"no edge across positions with a head-carried part and a reach to the answer "
            f"({int(cross.sum())} edges across positions, none with a finite positive score)"
        )
    return int(np.where(ok, score, -1.0).argmax())


def _top_pair(attr: Any) -> dict[str, Any]:
    """The largest positive feature × feature term whose key feature raises the score in all
    (its key marginal q · k_b is positive): scaling that feature down then lowers attention to
    the key, where a feature whose other terms outweigh the pair's would raise it."""
    terms = attr.terms.double()
    rows = torch.as_tensor(attr.query_meta["kind"] == "feature")
    cols = torch.as_tensor(attr.key_meta["kind"] == "feature") & (terms.sum(0) > 0)
    masked = torch.where(rows[:, None] & cols[None, :], terms, torch.zeros_like(terms))
    if not bool((masked > 0).any()):
        raise NothingToSteer(
            f"no positive feature × feature term whose key feature raises the score at "
            f"L{attr.layer}H{attr.head} (q={attr.q_pos}, k={attr.k_pos})"
        )
    i, j = divmod(int(masked.argmax()), masked.shape[1])
    score = attr.score
    return {
        "q_feature": int(attr.query_meta["feature"][i]),
        "k_feature": int(attr.key_meta["feature"][j]),
        "q_label": str(attr.query_meta["label"][i]),
        "k_label": str(attr.key_meta["label"][j]),
        "term": float(terms[i, j]),
        "share": float(terms[i, j]) / score if score != 0 else float("nan"),
    }


def _steer(model: Any, tokens: Any, t: Trace, freeze: bool) -> Any:
    return model.steer_qk(
        tokens, t.layer, t.steer_heads, side="key",
        features={(t.pair["k_feature"], t.k_pos): STEER_SCALE}, freeze_other_patterns=freeze,
    )  # fmt: skip


def carrying_heads(loadings: np.ndarray, top: int) -> list[int]:
    """The heads of one layer that carry an edge with the top head: those with its sign, largest
    first, until they hold ``CARRY_SHARE`` of that sign's loading in the layer."""
    sign = np.sign(loadings[top])
    if not np.isfinite(loadings).all() or sign == 0:
        raise NothingToSteer(f"head {top} carries none of the edge (loadings {loadings})")
    same = np.where(np.sign(loadings) == sign)[0]
    order = same[np.argsort(-np.abs(loadings[same]), kind="stable")]
    total = float(np.abs(loadings[same]).sum())
    out, held = [], 0.0
    for h in order:
        out.append(int(h))
        held += abs(float(loadings[h]))
        if held >= CARRY_SHARE * total:
            break
    return out


def trace(model: Any, item: Item) -> Trace:
    """Steps 2–4 of a case on one item (see the module's docstring)."""
    tokens = model.to_tokens(item.prompt)
    graph = model.transcoder_graph(tokens, targets=[item.answer])
    loadings = model.transcoder_loadings(graph)
    e = _cross_edge(graph, loadings)
    ed = graph.edges.iloc[e]
    nodes = graph.nodes
    info = {
        "source": ed["source"], "target": ed["target"],
        "source_label": nodes["label"].iloc[int(ed["source_index"])] or ed["source"],
        "target_label": nodes["label"].iloc[int(ed["target_index"])] or ed["target"],
        "source_pos": int(ed["source_pos"]), "target_pos": int(ed["target_pos"]),
        "weight": float(ed["weight"]),
    }  # fmt: skip
    heads = loadings.top_heads(e, 3)
    layer, head = int(heads["layer"].iloc[0]), int(heads["head"].iloc[0])
    steer_heads = carrying_heads(loadings.heads[e, layer].double().numpy(), head)
    q, k = info["target_pos"], info["source_pos"]
    attr = model.qk_attribution(tokens, layer, head, q, k)
    return Trace(graph, loadings, e, info, heads, layer, head, steer_heads, q, k, attr,
                 _top_pair(attr))  # fmt: skip


def flip_items(case: str, n: int, seed: int = 777, answer: str | None = None) -> list[Item]:
    """``n`` held-out items of ``case``, in the grammar's order; with ``answer``, only those whose
    right answer it is (e.g. the true statements of a check: ``answer="yes"``)."""
    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; cases: {', '.join(CASES)}")
    n = check_count("n", n)
    if answer is None:
        return held_out_items(case, n, seed=seed)
    if not isinstance(answer, str):
        raise TypeError(f"answer must be a string (an item's right answer), got {answer!r}")
    pool = held_out_items(case, 20 * n, seed=seed)
    out = [item for item in pool if item.answer == answer][:n]
    if len(out) < n:
        seen = sorted({item.answer for item in pool})
        shown = ", ".join(repr(a) for a in seen[:10]) + (", ..." if len(seen) > 10 else "")
        raise ValueError(
            f"only {len(out)} of {len(pool)} held-out {case!r} items answer {answer!r} (need "
            f"{n}); their answers include {shown}"
        )
    return out


def flip_rate(
    model: Any,
    case: str,
    n: int = N_FLIP,
    seed: int = 777,
    progress: bool = False,
    answer: str | None = None,
) -> pd.DataFrame:
    """On ``n`` held-out prompts (with ``answer``: only those whose right answer it is,
    :func:`flip_items`), each traced on its own (its edge, heads and pair: :func:`trace`) and
    steered with the hydra control; one row per prompt (``answered``: the clean model's top
    prediction is the answer; ``flipped``: after steering it is not). A prompt without an edge
    across positions or a pair to steer counts as not flipped."""
    rows = []
    for item in tqdm(
        flip_items(case, n, seed=seed, answer=answer),
        desc=f"{case} flips",
        disable=not progress,
    ):
        tokens = model.to_tokens(item.prompt)
        row: dict[str, Any] = {"prompt": item.prompt, "answer": item.answer}
        try:
            t = trace(model, item)
        except NothingToSteer as err:  # counted, and not flipped
            top = _top_token(model, item.prompt)
            rows.append({**row, "answered": top == item.answer, "before": top, "after": top,
                         "flipped": False, "layer": -1, "head": -1, "steer_heads": "",
                         "q_pos": -1, "k_pos": -1, "k_feature": -1, "evidence": False,
                         "pair": str(err)})  # fmt: skip
            continue
        st = _steer(model, tokens, t, freeze=True).summary()
        answered = st["top_before"] == item.answer
        rows.append({
            **row, "answered": answered, "before": st["top_before"], "after": st["top_after"],
            "flipped": bool(answered and st["top_after"] != item.answer),
            "layer": t.layer, "head": t.head,
            "steer_heads": ",".join(str(h) for h in t.steer_heads),
            "q_pos": t.q_pos, "k_pos": t.k_pos, "k_feature": t.pair["k_feature"],
            "evidence": t.k_pos in evidence_positions(item),
            "pair": f"{t.pair['q_label']} x {t.pair['k_label']}",
        })  # fmt: skip
    return pd.DataFrame(rows)


# where separating_heads reads attention: "final", from the "?" that the answer follows to the
# stated value; "statement", the paper's, from the stated value to what it is checked against
# (the object of a color check, the second operand of a sum)
SEPARATING_AT = ("final", "statement")
# a head is called a concordance or discordance head only when its mean attention on true and
# on false statements differs by at least this much (five points of attention); below it the
# study says that no head separates them there
SEPARATION_MIN = 0.05


def separating_where(case: str, at: str) -> str:
    """Words for where ``separating_heads(model, case, at=at)`` reads attention."""
    if at not in SEPARATING_AT:
        raise ValueError(f"at must be one of {SEPARATING_AT}, got {at!r}")
    if at == "final":
        return 'from "?" to the stated value'
    checked = "the object" if case == "correctness" else "the second operand"
    return f"from the stated value to {checked} (where the paper looked)"


def _separating_positions(item: Item, at: str) -> tuple[int, int]:
    """(query, key) prompt positions (BOS = 0) of ``separating_heads``'s view ``at``."""
    if at == "final":
        return len(item.words) - 1, _source(item)
    return _source(item), _checked(item)


def separating_heads(
    model: Any, case: str, n: int = 100, seed: int = 555, at: str = "final"
) -> pd.DataFrame:
    """Every head's mean attention on true vs false held-out statements, sorted by |difference|,
    with the head atlas's W_QK skew. ``at``: ``"final"`` reads attention from the final "?" to
    the stated value (where the answer is read); ``"statement"`` from the stated value to the
    object or the second operand (where the paper found its concordance and discordance
    heads)."""
    if case not in ("correctness", "arithmetic"):
        raise ValueError(f"separating_heads is for correctness and arithmetic, not {case!r}")
    if at not in SEPARATING_AT:
        raise ValueError(f"at must be one of {SEPARATING_AT}, got {at!r}")
    items = held_out_items(case, n, seed=seed)
    sums: dict[bool, torch.Tensor] = {}
    counts = {True: 0, False: 0}
    for item in items:
        cap = model.qk_capture(item.prompt)
        q, k = _separating_positions(item, at)
        att = torch.stack([cap.pattern(layer)[:, q, k] for layer in range(model.cfg.n_layers)])
        truth = item.answer == "yes"
        sums[truth] = sums.get(truth, 0) + att.double()
        counts[truth] += 1
    if not counts[True] or not counts[False]:
        raise ValueError(
            f"separating_heads needs true and false statements; {n} held-out {case} items "
            f"(seed {seed}) gave {counts[True]} true and {counts[False]} false: raise n"
        )
    mean_true, mean_false = sums[True] / counts[True], sums[False] / counts[False]
    skew = model.head_atlas(composition=False).frame.set_index(["layer", "head"])["qk_skew"]
    rows = []
    for layer in range(model.cfg.n_layers):
        for h in range(model.cfg.n_heads):
            d = float(mean_true[layer, h] - mean_false[layer, h])
            rows.append({
                "at": at, "layer": layer, "head": h, "attn_true": float(mean_true[layer, h]),
                "attn_false": float(mean_false[layer, h]), "difference": d,
                "kind": "concordance" if d > 0 else "discordance",
                "qk_skew": float(skew.loc[(layer, h)]),
            })  # fmt: skip
    out = pd.DataFrame(rows)
    return out.reindex(out["difference"].abs().sort_values(ascending=False).index).reset_index(
        drop=True
    )


def _two_name_items(n: int, seed: int) -> list[tuple[Item, int, int]]:
    """(item, recent, older): held-out stories with two names under the final title, with the
    two names' prompt positions."""
    out = []
    for item in held_out_items("induction", 20 * n, seed=seed):
        if item.foil is None:
            continue
        older = [p + 1 for key, p in item.marks.items()
                 if key.startswith("name") and item.words[p] == item.foil]  # fmt: skip
        out.append((item, _source(item), older[-1]))
        if len(out) == n:
            break
    return out


def name_head(model: Any, n: int = 20, seed: int = 999) -> tuple[int, int, float]:
    """(layer, head, attention): the head with the most attention from the final title to the
    two names under it, on ``n`` held-out stories."""
    items = _two_name_items(check_count("n", n), seed)
    if not items:
        raise ValueError("no held-out induction prompt has two names under the final title")
    total = 0
    for item, recent, older in items:
        cap = model.qk_capture(item.prompt)
        q = cap.n_tokens - 1
        att = torch.stack([cap.pattern(layer)[:, q, [recent, older]].sum(-1)
                           for layer in range(model.cfg.n_layers)]).double()  # fmt: skip
        total = total + att
    mean = total / len(items)
    layer, head = divmod(int(mean.argmax()), mean.shape[1])
    return layer, head, float(mean[layer, head])


def recency_split(model: Any, layer: int, head: int, n: int = 40, seed: int = 999) -> RecencySplit:
    """:class:`RecencySplit` on held-out induction prompts with two names under the final title."""
    rows, direct = [], None
    for item, recent, older in _two_name_items(n, seed):
        words = list(item.words[:-1])
        swapped = list(words)
        swapped[recent - 1], swapped[older - 1] = words[older - 1], words[recent - 1]
        q = len(words)  # BOS + words: the last position
        deltas, probs = [], None
        for w in (words, swapped):
            a = model.qk_attribution(" ".join(w), layer, head, q, recent, key_basis="upstream")
            b = model.qk_attribution(" ".join(w), layer, head, q, older, key_basis="upstream")
            deltas.append(a.score - b.score)
            if probs is None:
                probs = (a.prob, b.prob)
                km = a.key_marginals().groupby("label")["marginal"].sum()
                kb = b.key_marginals().groupby("label")["marginal"].sum()
                part = km.sub(kb, fill_value=0.0)
                direct = part if direct is None else direct.add(part, fill_value=0.0)
        d, ds = deltas
        rows.append({
            "prompt": " ".join(words), "recent": words[recent - 1], "older": words[older - 1],
            "distance": recent - older, "delta": d, "delta_swapped": ds,
            "positional": (d + ds) / 2, "content": (d - ds) / 2,
            "p_recent": probs[0], "p_older": probs[1],
        })  # fmt: skip
    if not rows:
        raise ValueError("no held-out induction prompt has two names under the final title")
    frame = pd.DataFrame(rows)
    total = float(frame["delta"].sum())
    dframe = direct.rename("delta").reset_index()
    dframe["share"] = dframe["delta"] / total if total else np.nan
    dframe = dframe.reindex(dframe["delta"].abs().sort_values(ascending=False).index)
    return RecencySplit(layer, head, frame, dframe.reset_index(drop=True))


def run_case(
    model: Any,
    case: str,
    item: Item | None = None,
    n_flip: int = N_FLIP,
    seed: int = 12345,
    progress: bool = False,
) -> CaseStudy:
    """Run one case end to end on the casebook model (attached, with its SAEs and transcoders)."""
    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; cases: {', '.join(CASES)}")
    n_flip = check_count("n_flip", n_flip)
    if model.qk_transcoders is None:
        raise ValueError("the casebook needs the model's transcoders (toy.load('casebook'))")
    if item is None:
        item = _choose_item(model, case, seed)
    elif not isinstance(item, Item) or item.case != case:
        got = item.case if isinstance(item, Item) else type(item).__name__
        raise ValueError(f"item must be a {case!r} Item (held_out_items({case!r}, n)), got {got!r}")
    tokens = model.to_tokens(item.prompt)
    str_tokens = list(model.to_str_tokens(item.prompt))
    prediction = _top_token(model, item.prompt)
    t = trace(model, item)
    layer, head, q, k = t.layer, t.head, t.q_pos, t.k_pos
    top_load = float(t.heads["loading"].iloc[0])
    pattern = model.qk_capture(tokens).pattern(layer)[head].detach().double().cpu().numpy()
    steering = _steer(model, tokens, t, freeze=True)
    steering_free = _steer(model, tokens, t, freeze=False)
    flips = flip_rate(model, case, n=n_flip, progress=progress, answer=FLIP_ANSWER.get(case))
    reverse = None
    if case in REVERSE_ANSWER:
        reverse = flip_rate(model, case, n=n_flip, progress=progress, answer=REVERSE_ANSWER[case])

    roles = item.roles()
    want_k = evidence_positions(item)
    want_key = _labels_for(item, k, roles)
    want_query = _labels_for(item, q, roles)
    pair = t.pair
    s = steering.summary()
    study = CaseStudy(
        case=case, model_name=str(model.cfg.model_name), item=item, str_tokens=str_tokens,
        prediction=prediction, trace=t, pattern=pattern, steering=steering,
        steering_free=steering_free, flips=flips, reverse_flips=reverse,
    )  # fmt: skip
    rate = study.flip_rate
    where = ", ".join(f"{p} ({str_tokens[p]!r})" for p in want_k)
    prompts = "true statements" if case in FLIP_ANSWER else "prompts"
    study.checks = [
        Check("answers", prediction == item.answer,
              f"top prediction {prediction!r}; the answer is {item.answer!r}"),
        Check("edge from the evidence", k in want_k,
              f"the edge across positions that matters most to the answer runs from position "
              f"{k} ({str_tokens[k]!r}) to {q} ({str_tokens[q]!r}); the grammar's evidence is "
              f"at {where}"),
        Check("the heads attend there", pattern[q, k] >= ATTENTION_MIN,
              f"L{layer}H{head} (loading {top_load:+.3f}, {t.heads['share'].iloc[0]:+.0%} of the "
              f"edge) puts {pattern[q, k]:.2f} of its attention from {q} on {k} (needs >= "
              f"{ATTENTION_MIN})"),
        Check("key feature tags the evidence", pair["k_label"] in want_key,
              f"key side {pair['k_label']!r} (term {pair['term']:+.3f}, {pair['share']:+.0%} of "
              f"the score); descriptions of position {k}: {sorted(want_key)}"),
        Check("query feature reads the question", pair["q_label"] in want_query,
              f"query side {pair['q_label']!r}; descriptions of position {q}: "
              f"{sorted(want_query)}"),
        Check("steering flips this answer",
              s["top_before"] == item.answer and s["top_after"] != item.answer,
              f"{s['top_before']!r} -> {s['top_after']!r} (prob {s['top_after_prob']:.2f})"),
        Check("steering flips held-out answers", rate >= FLIP_MIN,
              f"{int(flips['flipped'].sum())} of {int(flips['answered'].sum())} answered "
              f"held-out {prompts} ({rate:.0%}; needs >= {FLIP_MIN:.0%}), each traced on its "
              "own"),
    ]  # fmt: skip
    if steering_free.summary()["top_after"] == item.answer and s["top_after"] != item.answer:
        study.notes.append(
            "without the hydra control the answer survives the steering: other heads "
            "compensate when their patterns may change"
        )
    if case in ("correctness", "arithmetic"):
        views = [separating_heads(model, case, at=at) for at in SEPARATING_AT]
        study.separating = pd.concat(views, ignore_index=True)
        for sep in views:
            view = separating_where(case, sep["at"].iloc[0])
            top = sep.iloc[0]
            if abs(top["difference"]) < SEPARATION_MIN:
                study.notes.append(
                    f"attention {view}: no head separates true from false statements by "
                    f"{SEPARATION_MIN} or more (largest: L{top['layer']}H{top['head']}, true "
                    f"{top['attn_true']:.2f} vs false {top['attn_false']:.2f})"
                )
                continue
            for r in sep.head(2).itertuples():
                if abs(r.difference) < SEPARATION_MIN:
                    break
                expect = 1 if r.kind == "concordance" else -1
                want = "positive" if expect > 0 else "negative"
                head_is = (f"attention {view}: L{r.layer}H{r.head} is a {r.kind} head "
                           f"(true {r.attn_true:.2f} vs false {r.attn_false:.2f})")  # fmt: skip
                if r.qk_skew * expect < SKEW_CLEAR:
                    study.notes.append(
                        f"{head_is} but its W_QK skew is {r.qk_skew:+.2f}, not clearly {want} "
                        f"(|skew| >= {SKEW_CLEAR}); the paper saw {want} skew for such heads"
                    )
                else:
                    study.notes.append(f"{head_is}; its W_QK skew is {r.qk_skew:+.2f}, {want} "
                                       "as the paper saw for such heads")  # fmt: skip
    if case == "induction":
        rl, rh, attn = name_head(model)
        study.recency = recency_split(model, rl, rh)
        share = study.recency.positional_share
        study.notes.append(
            f"recency: at L{rl}H{rh}, the head that attends most from the final title to the two "
            f"names ({attn:.2f} of its attention on them), {share:.0%} of the preference for the "
            "more recent name is positional (the part that survives swapping the two names)"
        )
    return study
