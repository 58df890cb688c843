"""The induction story, checked end to end on a model: the computation behind ``qk-lens demo``.

1. Find the previous-token and induction heads from their patterns on repeated random probes.
2. At the strongest induction head, attribute the score of a repeated token's query to the key
   right after its earlier occurrence, over the layer's dictionary: the textbook mechanism says
   the top interaction is "current token = A" (query) × "previous token = A" (key).
3. Attribute the same score with the key side split into upstream components: the key side should
   come from the previous-token head's output (K-composition).
Each step is a named check with the numbers behind it; the story is confirmed when all pass.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from torch import Tensor

from qk_lens.atlas.probes import (
    SCORE_COLUMNS,
    default_probe_length,
    pattern_scores,
    repeated_random_tokens,
    strongest,
)
from qk_lens.attribution import QKAttribution
from qk_lens.checks import check_count, check_position
from qk_lens.views import Report, bar_list, pattern_heatmap, table

_LABEL = re.compile(r"^\s*(current token|previous token)\s*=\s*(.+?)\s*$")
# a head "is" a previous-token / induction head above these mean attentions on the probes
PREVIOUS_TOKEN_MIN = 0.4
INDUCTION_MIN = 0.4


def parse_token_label(label: Any) -> tuple[str, str] | None:
    """("current token", "fox") from "current token = fox"; None for other labels."""
    m = _LABEL.match(str(label)) if isinstance(label, str) else None
    return (m.group(1), m.group(2)) if m else None


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class InductionStory:
    """Everything the demo found, with the checks; ``report()`` renders it as HTML."""

    model_name: str
    prompt_tokens: list[int]
    str_tokens: list[str]
    head_scores: pd.DataFrame
    previous_token_head: tuple[int, int]
    induction_head: tuple[int, int]
    q_pos: int
    k_pos: int
    attribution: QKAttribution  # dictionary basis on both sides
    upstream: QKAttribution  # dictionary query side, upstream key side
    pattern: np.ndarray  # the induction head's pattern on the prompt [q, k]
    previous_pattern: np.ndarray  # the previous-token head's pattern on the prompt
    checks: list[Check] = field(default_factory=list)
    top_k: int = 8
    atlas: Any = None  # the model's HeadAtlas, shown in the report when present

    @property
    def confirmed(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    @property
    def token(self) -> str:
        return self.str_tokens[self.q_pos]

    def top(self) -> pd.DataFrame:
        cols = ["q_label", "k_label", "term", "share", "q_activation", "k_activation"]
        return self.attribution.top(self.top_k)[cols]

    def key_sources(self) -> pd.DataFrame:
        """The upstream key parts by their contribution to the score (q · k_part)."""
        km = self.upstream.key_marginals()
        return km[["kind", "label", "marginal"]].rename(columns={"marginal": "contribution"})

    def key_writer(self) -> str:
        """The upstream component contributing most to the score through the key side."""
        src = self.key_sources()
        return str(src.iloc[int(np.argmax(src["contribution"].to_numpy()))]["label"])

    def verdict(self) -> str:
        il, ih = self.induction_head
        if self.confirmed:
            return (
                f"Confirmed: L{il}H{ih} is an induction head. At the repeated token "
                f"{self.token!r} (position {self.q_pos}) it attends to position {self.k_pos}, the "
                f"token after the earlier {self.token!r}, because its query feature "
                f'"current token = {self.token}" meets the key feature "previous token = '
                f'{self.token}", and that key feature was written by the previous-token head '
                f"{self.key_writer()}."
            )
        failed = "; ".join(f"{c.name}: {c.detail}" for c in self.checks if not c.ok)
        return f"Not confirmed. {failed}"

    def summary(self) -> str:
        """Plain-text account for a terminal."""
        lines = [
            f"model: {self.model_name}",
            f"prompt: {' '.join(self.str_tokens)}",
            f"strongest previous-token head: L{self.previous_token_head[0]}H{self.previous_token_head[1]}   "
            f"induction head: L{self.induction_head[0]}H{self.induction_head[1]}",
            f"query position {self.q_pos} ({self.token!r}) -> key position {self.k_pos} "
            f"({self.str_tokens[self.k_pos]!r}): score {self.attribution.score:.3f}, "
            f"prob {self.attribution.prob:.3f}",
            "",
            f"top {self.top_k} interactions (query part x key part = term):",
        ]
        for _, r in self.top().iterrows():
            lines.append(
                f"  {r['q_label'] or '?':<26} x {r['k_label'] or '?':<26} {r['term']:+9.3f} "
                f"({r['share']:+.0%} of the score)"
            )
        lines += ["", "where the key side comes from (upstream basis, contribution to the score):"]
        for _, r in self.key_sources().head(5).iterrows():
            lines.append(f"  {r['label']:<28} {r['contribution']:+9.3f}")
        lines += ["", "checks:"]
        lines += [f"  [{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}" for c in self.checks]
        lines += ["", self.verdict()]
        return "\n".join(lines)

    def report(self) -> Report:
        """A self-contained HTML :class:`qk_lens.views.Report`."""
        (pl, ph), (il, ih) = self.previous_token_head, self.induction_head
        rep = Report(f"qk_lens demo: the induction story on {self.model_name}")
        rep.verdict(self.confirmed, self.verdict())
        rep.add(
            "Checks",
            table(pd.DataFrame([c.__dict__ for c in self.checks]), max_rows=20),
        )
        rep.add(
            f"Induction head L{il}H{ih}: attention pattern",
            pattern_heatmap(
                self.pattern,
                self.str_tokens,
                highlight=[(self.q_pos, self.k_pos)],
                caption=f"outlined: query {self.q_pos} ({self.token!r}) → key {self.k_pos}",
            ),
        )
        rep.add(
            f"Why L{il}H{ih} attends there: top query-feature × key-feature terms",
            table(
                self.top(),
                signed_columns=["term", "share"],
                caption=(
                    f"score {self.attribution.score:.4f} (model's own: "
                    f"{self.attribution.model_score:.4f}); terms sum to it exactly"
                ),
            ),
            table(self.attribution.coverage(), caption="how much the dictionary explains"),
        )
        sources = self.key_sources().head(12)
        rep.add(
            "Who wrote the key: upstream components of the key side",
            bar_list(
                list(zip(sources["label"], sources["contribution"], strict=True)),
                caption="contribution of each key-side component to the score",
            ),
        )
        rep.add(
            f"Previous-token head L{pl}H{ph}: attention pattern",
            pattern_heatmap(self.previous_pattern, self.str_tokens),
        )
        if self.atlas is not None:
            rep.add(
                "Head atlas: what every head does (weights and patterns)",
                self.atlas.grid(),
                self.atlas.heatmap("induction"),
                self.atlas.heatmap("ov_copying"),
            )
        rep.add(
            "Head scores on repeated random probes",
            table(
                self.head_scores.round(3),
                max_rows=200,
                caption="mean attention to each target on BOS, s, s probes",
            ),
        )
        return rep


def default_prompt(model: Any, length: int = 9, seed: int = 7) -> Tensor:
    """``BOS, s, s`` with ``s`` ``length`` distinct random tokens of the model's vocabulary (as token
    ids, so it works with any tokenizer)."""
    length = min(length, (model.cfg.n_ctx - 1) // 2)
    return repeated_random_tokens(model, n=1, length=length, seed=seed)


def choose_pair(tokens: list[int], q_pos: int | None = None) -> tuple[int, int]:
    """(q, k): ``q`` a repeated token (the last one by default), ``k`` the position after its
    most recent earlier occurrence."""
    candidates = []
    for q in range(len(tokens)):
        earlier = [j for j in range(1, q - 1) if tokens[j] == tokens[q]]
        if earlier:
            candidates.append((q, earlier[-1] + 1))
    if q_pos is not None:
        q = check_position("q_pos", q_pos, len(tokens))
        for cq, ck in candidates:
            if cq == q:
                return cq, ck
        raise ValueError(
            f"q_pos={q_pos}: the token there does not occur earlier in the prompt with a token "
            "after it, so there is no induction target; choose a repeated token's position"
        )
    if not candidates:
        raise ValueError(
            "the prompt has no repeated token, so there is nothing for an induction head to do; "
            "repeat a few words, e.g. 'fox owl cat jay fox owl cat jay'"
        )
    return candidates[-1]


def run_story(
    model: Any,
    prompt: Any = None,
    q_pos: int | None = None,
    top_k: int = 8,
    n_probes: int = 32,
    atlas: bool = True,
) -> InductionStory:
    """Run the three steps on an attached model with a dictionary at the induction layer."""
    top_k = check_count("top_k", top_k)
    if atlas:
        # the atlas probes with the same BOS, s, s prompts: its pattern columns are the scores
        head_atlas = model.head_atlas(n_probes=n_probes, probe_length=default_probe_length(model))
        scores = head_atlas.frame[["layer", "head", *SCORE_COLUMNS]].copy()
    else:
        head_atlas = None
        scores = pattern_scores(model, n=n_probes)
    later = range(1, model.cfg.n_layers)
    il, ih, ind = strongest(scores, "induction", later)
    pl, ph, prev = strongest(scores, "previous_token", range(0, il))
    prompt = default_prompt(model) if prompt is None else prompt
    cap = model.qk_capture(prompt)
    tokens = cap.tokens.tolist()
    q, k = choose_pair(tokens, q_pos)
    attr = model.qk_attribution(prompt, il, ih, q, k)
    up = model.qk_attribution(prompt, il, ih, q, k, query_basis="dictionary", key_basis="upstream")
    str_tokens = list(cap.str_tokens)
    story = InductionStory(
        model_name=str(getattr(model.cfg, "model_name", "model")),
        prompt_tokens=tokens,
        str_tokens=str_tokens,
        head_scores=scores,
        previous_token_head=(pl, ph),
        induction_head=(il, ih),
        q_pos=q,
        k_pos=k,
        attribution=attr,
        upstream=up,
        pattern=cap.pattern(il)[ih].detach().double().cpu().numpy(),
        previous_pattern=cap.pattern(pl)[ph].detach().double().cpu().numpy(),
        top_k=top_k,
        atlas=head_atlas,
    )
    story.checks = _checks(story, prev, ind)
    return story


def _checks(s: InductionStory, prev: float, ind: float) -> list[Check]:
    (pl, ph), (il, ih) = s.previous_token_head, s.induction_head
    row = s.pattern[s.q_pos]
    argmax = int(np.nanargmax(row))
    top = s.attribution.top(1).iloc[0]
    q_lab, k_lab = parse_token_label(top["q_label"]), parse_token_label(top["k_label"])
    want_q, want_k = ("current token", s.token), ("previous token", s.token)
    src = s.key_sources()
    best = src.iloc[int(np.argmax(src["contribution"].to_numpy()))]
    # every earlier head that is a previous-token head on the probes may write the key
    sc = s.head_scores
    prev_heads = sc[(sc["layer"] < il) & (sc["previous_token"] >= PREVIOUS_TOKEN_MIN)]
    want = {
        f"L{int(r.layer)}H{int(r.head)}": float(r.previous_token) for r in prev_heads.itertuples()
    }
    want_src = ", ".join(f"{k} ({v:.2f})" for k, v in want.items()) or "none found"
    return [
        Check(
            "previous-token head",
            prev >= PREVIOUS_TOKEN_MIN,
            f"L{pl}H{ph} puts {prev:.2f} of its attention on the previous token "
            f"(needs >= {PREVIOUS_TOKEN_MIN})",
        ),
        Check(
            "induction head",
            ind >= INDUCTION_MIN,
            f"L{il}H{ih} puts {ind:.2f} of its attention on the token after the earlier "
            f"occurrence (needs >= {INDUCTION_MIN})",
        ),
        Check(
            "attends to the induction target",
            argmax == s.k_pos,
            f"on the prompt, query {s.q_pos} attends most to key {argmax} "
            f"(prob {row[argmax]:.2f}); the target is {s.k_pos} (prob {row[s.k_pos]:.2f})",
        ),
        Check(
            "top interaction",
            q_lab == want_q and k_lab == want_k,
            f"top term {top['term']:+.3f}: {top['q_label'] or top['q_kind']!r} x "
            f"{top['k_label'] or top['k_kind']!r}; expected 'current token = {s.token}' x "
            f"'previous token = {s.token}'",
        ),
        Check(
            "key written by a previous-token head",
            best["label"] in want,
            f"largest key-side contribution: {best['label']} ({best['contribution']:+.3f}); "
            f"previous-token heads (attention to the previous token >= {PREVIOUS_TOKEN_MIN}): "
            f"{want_src}",
        ),
    ]
