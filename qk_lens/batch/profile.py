"""A head's QK profile: the interactions that recur across the prompts of a run.

For every head, each (query part × key part) interaction that appears among a pair's listed
terms is counted over all pairs of all prompts: how often (``count``, in how many prompts, what
fraction of the head's pairs), its mean term and its mean share of the pair's score, and the
first prompts it appears in. Parts are read one at a time and folded into a running aggregate,
so memory follows the number of distinct interactions, not the rows of the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from qk_lens.batch.store import PART_GLOB
from qk_lens.files import atomic_path

KEY = ["layer", "head", "q_kind", "q_feature", "q_label", "k_kind", "k_feature", "k_label"]
PAIR = ["prompt", "layer", "head", "q_pos", "k_pos"]
COLUMNS = ["prompt", "layer", "head", "q_pos", "k_pos", "score", "rank", *KEY[2:], "term"]


@dataclass
class QKProfile:
    """Recurring interactions per head (one row per head × query part × key part)."""

    frame: pd.DataFrame
    pairs: pd.DataFrame  # pairs per (layer, head): the denominator of frac_pairs
    n_prompts: int
    info: dict[str, Any] = field(default_factory=dict)

    def head(
        self, layer: int, head: int, top_k: int = 10, features_only: bool = False,
        by: str = "count",
    ) -> pd.DataFrame:  # fmt: skip
        """The head's top interactions: most frequent (``by="count"``, then largest |mean
        term|), or largest total contribution over its pairs (``by="total"``: |count ×
        mean term|)."""
        if by not in ("count", "total"):
            raise ValueError(f"by must be 'count' or 'total', got {by!r}")
        fr = self.frame
        f = fr[(fr["layer"] == layer) & (fr["head"] == head)]
        if f.empty:
            have = sorted(set(zip(fr["layer"], fr["head"], strict=True)))
            raise ValueError(f"no interactions for L{layer}H{head}; heads with some: {have}")
        if features_only:
            f = f[(f["q_kind"] == "feature") & (f["k_kind"] == "feature")]
        if by == "total":
            total = (f["count"] * f["mean_term"]).abs()
            f = f.loc[total.sort_values(ascending=False, kind="stable").index]
        return f.head(top_k).reset_index(drop=True)

    def save(self, path: str | Path) -> Path:
        """Write the profile as Parquet (atomically)."""
        path = Path(path)
        with atomic_path(path) as tmp:
            pq.write_table(pa.Table.from_pandas(self.frame, preserve_index=False), tmp)
        return path

    def report(self, title: str = "QK profile", top_k: int = 10) -> Any:
        from qk_lens.views.profile import profile_report

        return profile_report(self, title, top_k)

    def __repr__(self) -> str:
        return (
            f"QKProfile({self.n_prompts} prompts, {len(self.pairs)} heads, "
            f"{len(self.frame)} distinct interactions)"
        )


def _partial(df: pd.DataFrame, examples: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    pairs = df.drop_duplicates(PAIR).groupby(["layer", "head"]).size().rename("pairs")
    listed = df[df["rank"] >= 0].copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        share = listed["term"].to_numpy() / listed["score"].to_numpy()
    listed["share"] = np.where(np.isfinite(share), share, np.nan)
    listed["has_share"] = np.isfinite(listed["share"]).astype(np.int64)
    g = listed.groupby(KEY, sort=False, observed=True)
    agg = g.agg(
        count=("term", "size"),
        sum_term=("term", "sum"),
        sum_share=("share", "sum"),  # NaN skipped
        n_share=("has_share", "sum"),
    )
    firsts = listed.drop_duplicates([*KEY, "prompt"])
    agg["n_prompts"] = firsts.groupby(KEY, sort=False, observed=True).size()
    agg["examples"] = firsts.groupby(KEY, sort=False, observed=True)["prompt"].agg(
        lambda s: list(s.iloc[:examples])
    )
    return agg, pairs.to_frame()


def _merge(a: pd.DataFrame | None, b: pd.DataFrame, examples: int) -> pd.DataFrame:
    if a is None:
        return b
    both = pd.concat([a, b])
    sums = both.drop(columns="examples").groupby(level=list(range(len(KEY))), sort=False).sum()
    # parts come in prompt order, so the first examples stay the first
    ex = (
        both["examples"]
        .groupby(level=list(range(len(KEY))), sort=False)
        .agg(lambda s: [p for lst in s for p in lst][:examples])
    )
    sums["examples"] = ex
    return sums


def qk_profile(root: str | Path, examples: int = 3) -> QKProfile:
    """The QK profile of every head in a run folder's table (``qk-lens run`` output)."""
    parts = sorted((Path(root) / "table").glob(PART_GLOB))
    if not parts:
        raise FileNotFoundError(f"{root} has no parts (table/{PART_GLOB}); run it first")
    agg: pd.DataFrame | None = None
    pairs: pd.DataFrame | None = None
    prompts: set[int] = set()
    for path in parts:
        df = pq.read_table(path, columns=COLUMNS).to_pandas()
        prompts.update(df["prompt"].unique().tolist())
        if df.empty:
            continue
        a, p = _partial(df, examples)
        agg = _merge(agg, a, examples)
        pairs = p if pairs is None else pairs.add(p, fill_value=0)
    if agg is None or pairs is None:
        empty = pd.DataFrame(columns=[*KEY, "count", "n_prompts", "frac_pairs", "mean_term"])
        return QKProfile(empty, pd.DataFrame(columns=["layer", "head", "pairs"]), len(prompts))
    out = agg.reset_index()
    out = out.merge(pairs.reset_index(), on=["layer", "head"], how="left")
    out["frac_pairs"] = out["count"] / out["pairs"]
    out["mean_term"] = out["sum_term"] / out["count"]
    out["mean_share"] = out["sum_share"] / out["n_share"].where(out["n_share"] > 0)
    out["abs_mean"] = out["mean_term"].abs()
    out = out.sort_values(
        ["layer", "head", "count", "abs_mean"], ascending=[True, True, False, False]
    )
    cols = [*KEY, "count", "n_prompts", "frac_pairs", "mean_term", "mean_share", "examples"]
    out = out[cols].reset_index(drop=True)
    for c in ("count", "n_prompts", "layer", "head", "q_feature", "k_feature"):
        out[c] = out[c].astype(np.int64)
    pairs_frame = pairs.reset_index().astype({"pairs": np.int64})
    return QKProfile(out, pairs_frame, len(prompts))
