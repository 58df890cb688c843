"""The QK profile of a batch run as a report: per head, its recurring interactions (formatting
only; the counting is in ``qk_lens.batch.profile``)."""

from __future__ import annotations

from typing import Any

from qk_lens.views.html import Report, table

# feature ids beside labels: several features can share a label ("current token = <bos>")
SHOWN = [
    "q_label", "q_feature", "k_label", "k_feature", "count", "n_prompts", "frac_pairs",
    "mean_term", "mean_share", "examples",
]  # fmt: skip


def profile_report(profile: Any, title: str, top_k: int = 10) -> Report:
    """One section per head: its ``top_k`` most frequent interactions."""
    report = Report(title)
    info = ", ".join(f"{k}: {v}" for k, v in profile.info.items())
    report.add_text(
        "What this shows",
        f"{profile.n_prompts} prompts. For each head, the query part × key part interactions "
        "that recur among its pairs' listed terms: how many pairs list it (count), in how many "
        "prompts, the fraction of the head's pairs, its mean term and its mean share of the "
        "pair's score, and the first prompts (by index) it appears in."
        + (f"\n\n{info}" if info else ""),
    )
    listed = set(zip(profile.frame["layer"], profile.frame["head"], strict=True))
    for row in profile.pairs.itertuples(index=False):
        if (row.layer, row.head) not in listed:
            continue
        top = profile.head(int(row.layer), int(row.head), top_k=top_k)
        shown = top[SHOWN].copy()
        shown["examples"] = shown["examples"].map(lambda xs: ", ".join(str(int(x)) for x in xs))
        report.add(
            f"L{int(row.layer)}H{int(row.head)} ({int(row.pairs)} pairs)",
            table(shown, signed_columns=["mean_term"], max_rows=top_k),
        )
    return report
