"""Steering results: scores, patterns and outputs before and after, beside the prediction."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from qk_lens.attribution import CompletenessError
from qk_lens.attribution import tolerance as contract_tolerance
from qk_lens.checks import check_count, check_position, check_positions, is_int, renamed
from qk_lens.display import render
from qk_lens.steering.runs import masked


def check_changes(
    error: Tensor, scale: Tensor | None, dtype: torch.dtype, tolerance: float | None, what: str
) -> float:
    """Per-entry contract tolerance (or a given absolute one); NaN (masked) entries are skipped."""
    err = error.abs().nan_to_num(0.0)
    if tolerance is not None:
        tol = torch.full_like(err, float(tolerance))
    elif dtype == torch.float64 or scale is None:
        tol = torch.full_like(err, contract_tolerance(dtype, 1.0))
    else:
        # the row's scale, as in QKAttribution: rounding follows ‖q‖·‖k‖, not |score|
        tol = 1e-4 * scale.nan_to_num(0.0).amax(-1, keepdim=True).expand_as(err).clamp_min(1e-12)
    bad = err > tol
    worst = float(err.max()) if err.numel() else 0.0
    if bad.any():
        i = tuple(int(x) for x in torch.nonzero(bad)[0])
        raise CompletenessError(
            f"{what} by up to {worst:.3g} (at [head index, q, k] = {list(i)}: {float(err[i]):.3g} "
            f"> tolerance {float(tol[i]):.3g})"
        )
    return worst


@dataclass
class QKSteering:
    """Chosen heads' raw scores and patterns, and the model's output, before and after steering.

    ``scores_*`` are raw (pre-softcap, ALiBi included; −inf where masked), ``patterns_*`` the
    model's own, both ``[head, q, k]`` over ``heads``. ``predicted_change`` is the attribution's
    exact prediction (NaN where masked). ``logits_*`` are at the ``readout_pos`` positions;
    ``loss_*[p]`` is the next-token loss of position p (predicting token p + 1).
    """

    layer: int
    heads: list[int]
    side: str
    edits: pd.DataFrame
    tokens: Int[Tensor, "pos"]
    str_tokens: list[str] | None
    scores_before: Float[Tensor, "h q k"]
    scores_after: Float[Tensor, "h q k"]
    predicted_change: Float[Tensor, "h q k"]
    patterns_before: Float[Tensor, "h q k"]
    patterns_after: Float[Tensor, "h q k"]
    readout_pos: list[int]
    logits_before: Float[Tensor, "n_readout vocab"]
    logits_after: Float[Tensor, "n_readout vocab"]
    loss_before: Float[Tensor, "pos_minus_1"]
    loss_after: Float[Tensor, "pos_minus_1"]
    freeze_other_patterns: bool = False
    qk_norm: str = "frozen"
    scale: Float[Tensor, "h q k"] | None = field(default=None, repr=False)
    tokenizer: Any = field(default=None, repr=False)

    # ------------------------------------------------------------------ numbers
    @property
    def measured_change(self) -> Float[Tensor, "h q k"]:
        """scores_after − scores_before (NaN where masked)."""
        out = self.scores_after - self.scores_before
        return out.masked_fill(masked(self.scores_before), float("nan"))

    @property
    def error(self) -> Float[Tensor, "h q k"]:
        return self.measured_change - self.predicted_change

    def max_error(self) -> float:
        """max |measured − predicted| over unmasked (head, q, k)."""
        e = self.error.abs()
        e = e[~e.isnan()]
        return float(e.max()) if e.numel() else 0.0

    def check(self, tolerance: float | None = None) -> float:
        """Raise :class:`~qk_lens.CompletenessError` unless the measured score changes equal the predicted ones.

        The contract's tolerance: 1e-9 absolute in float64; in float32 1e-4 of each score row's
        scale ‖q‖·‖k‖/attn_scale (steered side included). Returns the largest |error|.
        """
        return check_changes(
            self.error, self.scale, self.scores_before.dtype, tolerance, self._what()
        )

    def _what(self) -> str:
        return (
            f"steering L{self.layer} heads {self.heads} ({self.side} side, "
            f"qk_norm={self.qk_norm!r}): measured score changes differ from the prediction"
        )

    def changed_pairs(self) -> tuple[Tensor, Tensor]:
        """(q, k) index tensors of the unmasked pairs the steering touches."""
        T = len(self.tokens)
        pos = torch.tensor(sorted(set(self.edits["position"].tolist())), dtype=torch.long)
        hit = torch.zeros(T, T, dtype=torch.bool)
        if self.side in ("key", "resid"):
            hit[:, pos] = True
        if self.side in ("query", "resid"):
            hit[pos, :] = True
        hit &= ~masked(self.scores_before[0])
        q, k = torch.nonzero(hit, as_tuple=True)
        return q, k

    # ------------------------------------------------------------------ tables
    def _tok(self, p: int) -> str | None:
        return self.str_tokens[p] if self.str_tokens else None

    def frame(self) -> pd.DataFrame:
        """One row per (head, q, k) the steering touches: scores, change, prediction, patterns."""
        q, k = self.changed_pairs()
        rows = []
        for i, h in enumerate(self.heads):
            rows.append(
                pd.DataFrame(
                    {
                        "layer": self.layer,
                        "head": h,
                        "q_pos": q.numpy(),
                        "k_pos": k.numpy(),
                        "q_token": [self._tok(int(p)) for p in q],
                        "k_token": [self._tok(int(p)) for p in k],
                        "score_before": self.scores_before[i, q, k].double().numpy(),
                        "score_after": self.scores_after[i, q, k].double().numpy(),
                        "change": self.measured_change[i, q, k].double().numpy(),
                        "predicted_change": self.predicted_change[i, q, k].double().numpy(),
                        "prob_before": self.patterns_before[i, q, k].double().numpy(),
                        "prob_after": self.patterns_after[i, q, k].double().numpy(),
                    }
                )
            )
        out = pd.concat(rows, ignore_index=True)
        out["error"] = out["change"] - out["predicted_change"]
        return out

    def attention(self, q_pos: int) -> pd.DataFrame:
        """The chosen heads' pattern rows at ``q_pos`` before and after, one row per key."""
        T = len(self.tokens)
        q = check_position("q_pos", q_pos, T)
        keys = torch.nonzero(~masked(self.scores_before[0, q]))[:, 0]
        out = pd.DataFrame({"k_pos": keys.numpy(), "k_token": [self._tok(int(k)) for k in keys]})
        for i, h in enumerate(self.heads):
            out[f"L{self.layer}H{h} before"] = self.patterns_before[i, q, keys].double().numpy()
            out[f"L{self.layer}H{h} after"] = self.patterns_after[i, q, keys].double().numpy()
        return out

    @property
    def readout(self) -> list[int]:
        """Deprecated name of :attr:`readout_pos`."""
        warnings.warn(
            "QKSteering.readout is deprecated; use .readout_pos", DeprecationWarning, stacklevel=2
        )
        return self.readout_pos

    def _readout_index(self, readout_pos: int | None) -> int:
        if readout_pos is None:
            return 0
        p = check_position("readout_pos", readout_pos, len(self.tokens))
        if p not in self.readout_pos:
            raise ValueError(
                f"readout_pos={readout_pos} is not a readout position; logits were kept at "
                f"{self.readout_pos}"
            )
        return self.readout_pos.index(p)

    def _decode(self, t: int) -> str:
        if self.tokenizer is None:
            return str(t)
        return self.tokenizer.decode([t])

    @renamed(k="top_k", pos="readout_pos")
    def predictions(self, top_k: int = 5, readout_pos: int | None = None) -> pd.DataFrame:
        """Top-``top_k`` next-token predictions at a readout position, before and after."""
        i = self._readout_index(readout_pos)
        k = check_count("top_k", top_k)
        rows = {}
        for when, logits in (("before", self.logits_before[i]), ("after", self.logits_after[i])):
            probs = logits.double().softmax(-1)
            p, t = probs.topk(min(k, len(probs)))
            rows[f"{when}_token"] = [self._decode(int(x)) for x in t]
            rows[f"{when}_id"] = t.numpy()
            rows[f"{when}_prob"] = p.numpy()
        out = pd.DataFrame(rows)
        out.index.name = "rank"
        return out

    @renamed(pos="readout_pos")
    def logit_diff(
        self, token: int, other: int | None = None, readout_pos: int | None = None
    ) -> pd.Series:
        """logit[token] − logit[other] (or logit[token] alone) before and after, at a readout."""
        i = self._readout_index(readout_pos)
        V = self.logits_before.shape[-1]
        for name, t in (("token", token), ("other", other)):
            if t is not None and (not is_int(t) or not 0 <= int(t) < V):
                raise ValueError(f"{name}={t!r} must be a token id in [0, {V})")

        def value(logits: Tensor) -> float:
            x = float(logits[i, int(token)])
            return x - float(logits[i, int(other)]) if other is not None else x

        b, a = value(self.logits_before), value(self.logits_after)
        return pd.Series({"before": b, "after": a, "change": a - b})

    def loss_change(self, positions: Any = None) -> float:
        """Mean next-token loss change over ``positions`` (None: every position but the last)."""
        n = len(self.loss_before)
        pos = list(range(n)) if positions is None else check_positions("positions", positions, n)
        return float((self.loss_after[pos] - self.loss_before[pos]).mean())

    def summary(self, target: tuple[int, int] | None = None) -> dict[str, Any]:
        """One row of numbers (a sweep's table is these rows): predictions, loss, attention."""
        i = 0
        before = self.logits_before[i].double().softmax(-1)
        after = self.logits_after[i].double().softmax(-1)
        top_b, top_a = int(before.argmax()), int(after.argmax())
        row: dict[str, Any] = {
            "top_before": self._decode(top_b),
            "top_after": self._decode(top_a),
            "top_after_prob": float(after[top_a]),
            "clean_top_prob": float(after[top_b]),
            "mean_loss_change": self.loss_change(),
            "max_error": self.max_error(),
        }
        if target is not None:
            if not isinstance(target, tuple) or len(target) != 2:
                raise TypeError(f"target must be a (q_pos, k_pos) tuple, got {target!r}")
            T = len(self.tokens)
            q = check_position("target q_pos", target[0], T)
            k = check_position("target k_pos", target[1], T)
            for j, h in enumerate(self.heads):
                row[f"L{self.layer}H{h} prob"] = float(self.patterns_after[j, q, k])
                row[f"L{self.layer}H{h} score"] = float(self.scores_after[j, q, k])
                # the attribution's prediction of that score (clean score + predicted change)
                row[f"L{self.layer}H{h} predicted score"] = float(
                    self.scores_before[j, q, k] + self.predicted_change[j, q, k]
                )
        return row

    def __repr__(self) -> str:
        return (
            f"QKSteering(L{self.layer} heads {self.heads}, {self.side} side, "
            f"{len(self.edits)} edits, max |measured − predicted| = {self.max_error():.3g}, "
            f"mean loss change {self.loss_change():+.4g})"
        )


@dataclass
class QKSteeringSweep:
    """The same steering at several scales: a table a notebook can plot against ``scale``."""

    scales: list[float]
    items: list[QKSteering]
    target: tuple[int, int]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> QKSteering:
        return self.items[i]

    def frame(self) -> pd.DataFrame:
        """One row per scale: top prediction, its probability, the clean top token's
        probability, loss change, the chosen heads' attention and raw score at ``target``."""
        rows = [
            {"scale": s, **it.summary(self.target)}
            for s, it in zip(self.scales, self.items, strict=True)
        ]
        return pd.DataFrame(rows)

    @renamed(k="top_k")
    def predictions(self, top_k: int = 5) -> pd.DataFrame:
        """Long table: (scale, rank) → the ``top_k`` tokens and probabilities after steering."""
        frames = []
        for s, it in zip(self.scales, self.items, strict=True):
            p = it.predictions(top_k)[["after_token", "after_prob"]].reset_index()
            frames.append(p.assign(scale=s))
        return pd.concat(frames, ignore_index=True).rename(
            columns={"after_token": "token", "after_prob": "prob"}
        )

    def check(self, tolerance: float | None = None) -> float:
        """Every scale's :meth:`QKSteering.check`; returns the largest error."""
        return max(it.check(tolerance) for it in self.items)

    def figure(self) -> Any:
        """A plotly figure against the scale: each head's score at the target pair, measured and
        predicted; its attention there; the top prediction's and the clean top token's
        probability (``.write_html(path, include_plotlyjs=True)`` for one offline file)."""
        it = self.items[0]
        heads = [f"L{it.layer}H{h}" for h in it.heads]
        q, k = self.target
        title = f"QK steering of L{it.layer} heads {it.heads} ({it.side} side), target q={q}, k={k}"
        return render("figure.sweep", self.frame(), heads, title)

    def __repr__(self) -> str:
        return f"QKSteeringSweep(scales={self.scales}, target={self.target})"


@dataclass
class ResidSteering:
    """A feature edited in the residual stream entering a layer: frozen-norm vs live-norm.

    ``predicted_change`` is exact with ln1 (and qk-norm) frozen at the clean scale;
    ``frozen_change`` is the model's own score change with those scales frozen (a check);
    ``live_change`` with live norms — the real effect. All raw scores, ``[head, q, k]``.
    """

    layer: int
    heads: list[int]
    edits: pd.DataFrame
    tokens: Int[Tensor, "pos"]
    str_tokens: list[str] | None
    scores_before: Float[Tensor, "h q k"]
    predicted_change: Float[Tensor, "h q k"]
    frozen_change: Float[Tensor, "h q k"]
    live_change: Float[Tensor, "h q k"]
    patterns_before: Float[Tensor, "h q k"]
    patterns_after: Float[Tensor, "h q k"]  # live norms
    live: QKSteering  # the live-norm run as a QKSteering (logits, loss, predictions)
    scale: Float[Tensor, "h q k"] | None = field(default=None, repr=False)

    def max_error(self) -> float:
        """max |frozen-norm measurement − prediction| over unmasked pairs (should be ~0)."""
        e = (self.frozen_change - self.predicted_change).abs()
        e = e[~e.isnan()]
        return float(e.max()) if e.numel() else 0.0

    def check(self, tolerance: float | None = None) -> float:
        """Raise :class:`~qk_lens.CompletenessError` unless the frozen-norm measurement equals the prediction."""
        what = f"residual edit at layer {self.layer}: frozen-norm score changes differ from the prediction"
        err = self.frozen_change - self.predicted_change
        return check_changes(err, self.scale, self.scores_before.dtype, tolerance, what)

    def frame(self) -> pd.DataFrame:
        """One row per (head, q, k) the edit touches: predicted (frozen), frozen, live changes."""
        q, k = self.live.changed_pairs()
        frames = []
        for i, h in enumerate(self.heads):
            frames.append(
                pd.DataFrame(
                    {
                        "layer": self.layer,
                        "head": h,
                        "q_pos": q.numpy(),
                        "k_pos": k.numpy(),
                        "score_before": self.scores_before[i, q, k].double().numpy(),
                        "predicted_change": self.predicted_change[i, q, k].double().numpy(),
                        "frozen_change": self.frozen_change[i, q, k].double().numpy(),
                        "live_change": self.live_change[i, q, k].double().numpy(),
                        "prob_before": self.patterns_before[i, q, k].double().numpy(),
                        "prob_after": self.patterns_after[i, q, k].double().numpy(),
                    }
                )
            )
        out = pd.concat(frames, ignore_index=True)
        out["live_minus_predicted"] = out["live_change"] - out["predicted_change"]
        return out

    def agreement(self) -> pd.Series:
        """How far the frozen-norm story carries: correlation and relative error, live vs predicted."""
        f = self.frame()
        p, m = f["predicted_change"].to_numpy(), f["live_change"].to_numpy()
        denom = np.abs(p).sum()
        corr = (
            float(np.corrcoef(p, m)[0, 1]) if len(p) > 1 and p.std() > 0 and m.std() > 0 else np.nan
        )
        return pd.Series(
            {
                "n_pairs": len(f),
                "correlation": corr,
                "relative_error": float(np.abs(m - p).sum() / denom) if denom > 0 else np.nan,
                "max_abs_error": float(np.abs(m - p).max()) if len(p) else 0.0,
            }
        )

    def __repr__(self) -> str:
        a = self.agreement()
        return (
            f"ResidSteering(L{self.layer}, {len(self.edits)} edits, frozen-norm error "
            f"{self.max_error():.3g}, live vs predicted: corr {a['correlation']:.3f}, "
            f"rel. error {a['relative_error']:.3g})"
        )
