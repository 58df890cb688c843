"""Causal checks: steer dictionary features inside chosen heads' QK circuit and watch what moves.

An attribution is a hypothesis; an intervention confirms it (the seed paper's steering
experiments). Two interventions, each returning the attribution's prediction beside the model's
own forward:

* :func:`steer_qk` changes **only** the chosen heads' pre-rotary queries (``attn.hook_q``) or keys
  (``attn.hook_k``) of one layer, only along the chosen features' projected directions, only at
  the chosen positions. With a feature's part of the key at position p written as
  ``k_f(p) = c_f(p) · lin_p(d_f) · W_K[g]`` (ln1 at its clean, frozen scale, as in the
  attribution), scaling the feature by ``s`` adds ``(s − 1) · k_f(p)``; ``add`` injects
  ``a · lin_p(d_f) · W_K[g]``. Values and every other head are untouched; later layers see only
  the consequences (the steered heads' new patterns). The score is bilinear in the parts, so the
  raw-score change is predicted exactly:
  ``Δs(q, k) = (s − 1) × key marginal of f at k`` (query side: × query marginal at q).
* :func:`steer_resid` edits a feature's vector in the residual stream entering the layer (every
  head sees it, and so does everything downstream). The frozen-norm prediction
  ``Δs = Δq·k + q·Δk + Δq·Δk`` is exact with ln1's scale held at its clean value (measured too, as
  a check); the live-norm measurement shows how far the frozen-norm story carries.

Architecture notes (documented choices):

* **GQA**: ``hook_k`` holds one key per kv head, shared by a group of query heads. To touch only
  the chosen query heads, the runs set TransformerLens's own
  ``cfg.ungroup_grouped_query_attention`` for their duration (restored afterwards): each query
  head then gets its own copy of its group's key (same numbers), and only the chosen copies move.
* **qk-norm** (Gemma-3, Qwen-3, OLMo-2): a change before the norm is not bilinear. By default
  (``qk_norm="frozen"``) the runs hold ``q_norm``/``k_norm``'s scale at its clean value, which is
  exactly steering after the norm in the linear picture the attribution uses; ``"live"`` lets the
  norm renormalize (then the bilinear prediction no longer holds and ``check()`` fails).
* **Softcap**: scores are reported raw (pre-softcap, ALiBi included), as in the attribution; the
  patterns are the model's own (post-softcap).
* ``freeze_other_patterns=True`` holds every other head's pattern (same layer and later layers)
  at its clean value: the seed's control for the hydra effect.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import einops
import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from qk_lens.attention import LayerQK, compute_dtype
from qk_lens.attribution import _tolerance, project_side
from qk_lens.bases import DictionaryBasis, PartsBatch, _meta
from qk_lens.capture import Capture

Side = Literal["query", "key"]
QKNorm = Literal["frozen", "live"]
FeatureKey = int | str | tuple[int | str, int]

__all__ = [
    "QKSteering",
    "QKSteeringSweep",
    "ResidSteering",
    "steer_qk",
    "steer_qk_sweep",
    "steer_resid",
]


# =========================================================================== validation
def _is_int(v: Any) -> bool:
    if isinstance(v, Tensor):
        return v.numel() == 1 and not v.is_floating_point() and v.dtype != torch.bool
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(float(v))


def _position(name: str, v: Any, n_tokens: int) -> int:
    if not _is_int(v):
        raise TypeError(f"{name} must be an int position, got {type(v).__name__}")
    v = int(v)
    if not -n_tokens <= v < n_tokens:
        raise ValueError(
            f"{name}={v} is past the prompt, which has {n_tokens} tokens: valid positions are "
            f"0..{n_tokens - 1} (or -{n_tokens}..-1 from the end)"
        )
    return v % n_tokens


def _positions(name: str, v: Any, n_tokens: int) -> list[int]:
    """None → every position; an int or an iterable of ints → those (sorted, unique)."""
    if v is None:
        return list(range(n_tokens))
    if _is_int(v):
        return [_position(name, v, n_tokens)]
    if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
        raise TypeError(f"{name} must be None, an int or a list of ints, got {type(v).__name__}")
    out = sorted({_position(name, p, n_tokens) for p in v})
    if not out:
        raise ValueError(f"{name} is empty; give at least one position, or None for all")
    return out


def _heads(v: Any, n_heads: int) -> list[int]:
    items = [v] if _is_int(v) else v
    if isinstance(items, (str, bytes)) or not isinstance(items, Iterable):
        raise TypeError(f"heads must be an int or a list of ints, got {type(v).__name__}")
    out = []
    for h in items:
        if not _is_int(h):
            raise TypeError(f"heads must hold ints, got {type(h).__name__}")
        h = int(h)
        if not 0 <= h < n_heads:
            raise ValueError(
                f"head {h} is out of range: this model has {n_heads} heads (0..{n_heads - 1})"
            )
        out.append(h)
    if not out:
        raise ValueError("heads is empty; give at least one head index")
    return sorted(set(out))


def _side(side: Any) -> Side:
    if side not in ("query", "key"):
        raise ValueError(f"side must be 'query' or 'key', got {side!r}")
    return side


def _qk_norm_mode(v: Any) -> QKNorm:
    if v not in ("frozen", "live"):
        raise ValueError(f"qk_norm must be 'frozen' or 'live', got {v!r}")
    return v


def _feature_ids(d: Any, key: int | str) -> list[int]:
    """A feature id, or every feature whose label is exactly ``key``."""
    if isinstance(key, str):
        ids = sorted(i for i, lab in d.labels.items() if lab == key)
        if not ids:
            raise ValueError(
                f"no feature of the layer-{d.layer} dictionary has the label {key!r}; give feature "
                "ids or an exact label (see model.qk_dictionaries[layer].labels)"
            )
        return ids
    if not _is_int(key):
        raise TypeError(
            f"feature keys must be an int id, a label string or an (id, position) tuple, got "
            f"{type(key).__name__}"
        )
    f = int(key)
    if not 0 <= f < d.d_sae:
        raise ValueError(
            f"feature id {f} is outside [0, {d.d_sae}) for the layer-{d.layer} dictionary"
        )
    return [f]


Edits = dict[tuple[int, int], float]
KeyGroups = list[tuple[Any, list[tuple[int, int]]]]  # each user key → the (feature, pos) it names


def _edit_map(
    name: str, mapping: Any, d: Any, positions: list[int], n_tokens: int
) -> tuple[Edits, KeyGroups]:
    """{feature | label | (feature, pos): value} → {(feature, pos): value}; later keys win."""
    if mapping is None:
        return {}, []
    if not isinstance(mapping, Mapping):
        raise TypeError(
            f"{name} must be a dict {{feature_id: value}} (keys may also be labels or "
            f"(feature_id, position) tuples), got {type(mapping).__name__}"
        )
    out: Edits = {}
    groups: KeyGroups = []
    for user_key, value in mapping.items():
        key = user_key
        if not _is_real(value):
            raise TypeError(f"{name}[{key!r}] must be a finite real number, got {value!r}")
        if isinstance(key, tuple):
            if len(key) != 2:
                raise ValueError(f"{name} key {key!r}: a tuple key must be (feature, position)")
            pos = [_position(f"{name} key {key!r} position", key[1], n_tokens)]
            key = key[0]
        else:
            pos = positions
        named = [(f, p) for f in _feature_ids(d, key) for p in pos]
        out.update(dict.fromkeys(named, float(value)))
        groups.append((user_key, named))
    return out, groups


# =========================================================================== the frozen maps
class _WholeResidual:
    """The residual entering the layer as one part: project_side then gives the full q or k."""

    key = ("residual",)

    def parts(self, model: Any, cap: Capture, layer: int, positions: Tensor) -> PartsBatch:
        x = cap.layer_act(layer, "hook_resid_pre").to(compute_dtype(model))[positions]
        n = len(positions)
        meta = _meta("residual", layer, -1, positions.numpy(), -1, np.nan, "residual")
        return PartsBatch(positions, x[:, None], torch.ones(n, 1, dtype=torch.bool), meta, "resid")


def full_side(model: Any, qk: LayerQK, side: Side, heads: Tensor) -> Float[Tensor, "h pos d_head"]:
    """The model's whole query (÷ attn_scale) or key at every position, through the frozen maps."""
    positions = torch.arange(qk.cap.n_tokens)
    ps = project_side(model, qk, side, _WholeResidual(), positions, heads)
    return (ps.vectors * ps.valid[None, :, :, None]).sum(2)


# =========================================================================== the plan
@dataclass
class _Setup:
    model: Any
    layer: int
    cap: Capture
    qk: LayerQK
    dictionary: Any
    heads: list[int]

    @property
    def n_tokens(self) -> int:
        return self.cap.n_tokens

    @property
    def head_t(self) -> Tensor:
        return torch.tensor(self.heads)


def _setup(model: Any, prompt: Any, layer: Any, heads: Any) -> _Setup:
    if not hasattr(model, "_qk_setup"):
        raise TypeError(
            f"model must be a HookedTransformer with qk_lens attached (qk_lens.attach(model)), "
            f"got {type(model).__name__}"
        )
    layer, cap, qk, qb, _ = model._qk_setup(prompt, layer, None, None, "dictionary")
    if not isinstance(qb, DictionaryBasis):
        raise TypeError("steering needs a dictionary basis for the layer")
    if heads is None:
        head_list = list(range(model.cfg.n_heads))
    else:
        head_list = _heads(heads, model.cfg.n_heads)
    return _Setup(model, layer, cap, qk, qb.dictionary, head_list)


@dataclass
class _Plan:
    """One condition: per edited (feature, position), the coefficient change, and its vectors."""

    edits: pd.DataFrame  # feature, label, position, coefficient, scale, add, delta
    positions: Int[Tensor, "n_pos"]  # positions with any edit
    delta: Float[Tensor, "n_pos d_model"]  # Σ_f Δc_f · W_dec[f], in the dictionary's space


def _coefficients(s: _Setup, positions: list[int]) -> dict[tuple[int, int], tuple[float, Tensor]]:
    """(feature, position) → (coefficient, c·d): the active parts of the exact decomposition."""
    if not positions:
        return {}
    pb = DictionaryBasis(s.dictionary).parts(s.model, s.cap, s.layer, torch.tensor(positions))
    feats = pb.meta["kind"] == "feature"
    W = s.dictionary.decoder(pb.vectors.dtype, pb.vectors.device)
    vectors = pb.vectors[pb.valid][torch.from_numpy(feats)]
    out = {}
    for f, p, vec in zip(
        pb.meta["feature"][feats], pb.meta["position"][feats], vectors, strict=True
    ):
        d = W[int(f)]
        # the coefficient, read back for the table; the edit itself reuses the part's own vector
        norm2 = float(d @ d)
        out[(int(f), int(p))] = (float(vec @ d) / norm2 if norm2 > 0 else 0.0, vec)
    return out


def _plan(
    s: _Setup,
    scales: dict[tuple[int, int], float],
    adds: dict[tuple[int, int], float],
    coeffs: dict[tuple[int, int], tuple[float, Tensor]],
) -> _Plan:
    d = s.dictionary
    dt = s.qk.dtype
    device = s.cap.layer_act(s.layer, "hook_resid_pre").device  # where the frozen maps live
    W = d.decoder(dt, device)
    keys = sorted(set(scales) | set(adds), key=lambda fp: (fp[1], fp[0]))
    rows, vecs = [], []
    for f, p in keys:
        c, part = coeffs.get((f, p), (0.0, None))
        sc = scales.get((f, p), 1.0)
        a = adds.get((f, p), 0.0)
        if (sc == 1.0 or part is None) and a == 0.0:
            continue
        vec = torch.zeros(W.shape[1], dtype=dt, device=device)
        if part is not None and sc != 1.0:
            vec = vec + (sc - 1.0) * part.to(dt)  # exactly (s − 1) × the attribution's part
        if a != 0.0:
            vec = vec + a * W[f]
        rows.append(
            {
                "feature": f,
                "label": d.label(f),
                "position": p,
                "coefficient": c,
                "scale": sc,
                "add": a,
                "new_coefficient": sc * c + a,
            }
        )
        vecs.append((p, vec))
    columns = ["feature", "label", "position", "coefficient", "scale", "add", "new_coefficient"]
    edits = pd.DataFrame(rows, columns=columns)
    positions = sorted({p for p, _ in vecs})
    pos_index = {p: i for i, p in enumerate(positions)}
    delta = torch.zeros(len(positions), W.shape[1], dtype=dt, device=device)
    for p, vec in vecs:
        delta[pos_index[p]] += vec
    return _Plan(edits, torch.tensor(positions, dtype=torch.long), delta)


def _check_active(groups: KeyGroups, coeffs: dict, d: Any) -> None:
    """Scaling features inactive everywhere a key names changes nothing: say so."""
    for key, named in groups:
        if any(fp in coeffs for fp in named):
            continue
        feats = sorted({f for f, _ in named})
        pos = sorted({p for _, p in named})
        active = sorted({p for (g, p) in coeffs if g in feats})
        where = f"active at positions {active[:12]}" if active else "active nowhere on this prompt"
        what = (
            f"feature {feats[0]} ({d.label(feats[0]) or 'unlabelled'})"
            if len(feats) == 1
            else (f"features {feats[:8]} ({key!r})")
        )
        raise ValueError(
            f"{what} is not active at the steered position(s) {pos[:12]} ({where}), so scaling "
            f"changes nothing; steer where it is active, or inject with add={{{feats[0]}: "
            "coefficient}"
        )


# =========================================================================== running the model
@contextmanager
def _ungrouped(model: Any):
    """GQA: give each query head its own copy of its group's key/value (TransformerLens's switch)."""
    cfg = model.cfg
    gqa = cfg.n_key_value_heads is not None and cfg.n_key_value_heads != cfg.n_heads
    if not gqa or cfg.ungroup_grouped_query_attention:
        yield
        return
    cfg.ungroup_grouped_query_attention = True
    try:
        yield
    finally:
        cfg.ungroup_grouped_query_attention = False


def _name(layer: int, hook: str) -> str:
    return f"blocks.{layer}.{hook}"


def _qk_norm_hooks(model: Any, layer: int) -> list[str]:
    names = [_name(layer, "attn.q_norm.hook_scale"), _name(layer, "attn.k_norm.hook_scale")]
    return [n for n in names if n in model.hook_dict]


def _score_hooks(model: Any, qk: LayerQK, layer: int) -> list[str]:
    names = [_name(layer, "attn.hook_attn_scores"), _name(layer, "attn.hook_pattern")]
    if qk.softcap is not None and qk.rotary:
        names += [_name(layer, "attn.hook_rot_q"), _name(layer, "attn.hook_rot_k")]
    return names


@dataclass
class _Run:
    raw: Float[Tensor, "b h q k"]  # chosen heads' raw (pre-softcap) scores
    pattern: Float[Tensor, "b h q k"]
    logits: Float[Tensor, "b n_readout vocab"]
    loss: Float[Tensor, "b pos_minus_1"]
    acts: dict[str, Tensor]


def _forward(
    s: _Setup,
    n_batch: int,
    hooks: list[tuple[str, Callable]],
    record: Sequence[str],
    readout: list[int],
) -> _Run:
    model, qk = s.model, s.qk
    acts: dict[str, Tensor] = {}

    def save(t: Tensor, hook: Any) -> None:
        acts[hook.name] = t.detach()

    names = list(dict.fromkeys([*_score_hooks(model, qk, s.layer), *record]))
    tokens = s.cap.tokens.to(model.cfg.device)[None].expand(n_batch, -1)
    with torch.no_grad(), _ungrouped(model):
        logits = model.run_with_hooks(
            tokens, fwd_hooks=[*hooks, *[(n, save) for n in names]], return_type="logits"
        )
    # next-token losses on the device, then only the readout rows of the logits come back
    target = s.cap.tokens[1:].to(logits.device)[None].expand(n_batch, -1)
    loss = F.cross_entropy(logits[:, :-1].transpose(1, 2).to(qk.dtype), target, reduction="none")
    heads = s.head_t
    raw = _raw_scores(qk, acts, heads, s.layer)
    pattern = acts[_name(s.layer, "attn.hook_pattern")][:, heads].to(qk.dtype).cpu()
    kept = logits[:, readout].detach().to(qk.dtype).cpu()
    return _Run(raw, pattern, kept, loss.detach().cpu(), acts)


def _raw_scores(qk: LayerQK, acts: dict[str, Tensor], heads: Tensor, layer: int) -> Tensor:
    """Pre-softcap scores (ALiBi included, −inf where masked), like LayerQK.model_raw_scores."""
    final = acts[_name(layer, "attn.hook_attn_scores")][:, heads].to(qk.dtype).cpu()
    if qk.softcap is None:
        return final
    masked = torch.isneginf(final)
    if qk.rotary:
        q = acts[_name(layer, "attn.hook_rot_q")].to(qk.dtype).cpu()
        k = acts[_name(layer, "attn.hook_rot_k")].to(qk.dtype).cpu()
        T = q.shape[1]
        if qk.logn:
            q = q * qk._logn_factor(torch.arange(T))[None, :, None, None]
        k = torch.repeat_interleave(k, q.shape[2] // k.shape[2], dim=2)
        raw = einops.einsum(q[:, :, heads], k[:, :, heads], "b q h d, b k h d -> b h q k")
        raw = raw / qk.attn_scale
    else:
        cap = qk.softcap
        raw = cap * torch.atanh((final / cap).clamp(-1 + 1e-15, 1 - 1e-15))
    return raw.masked_fill(masked, float("-inf"))


def _replace_with_clean(clean: Tensor, rows: Tensor | None = None) -> Callable:
    """A hook that swaps in the clean value (batch repeated; optionally only some batch rows)."""

    def hook(t: Tensor, hook: Any) -> Tensor:
        n_batch = t.shape[0] // clean.shape[0]
        full = clean.to(t.device, t.dtype).repeat(n_batch, *[1] * (t.ndim - 1))
        if rows is None:
            return full
        # qk-norm scales are flattened [batch·pos·head, 1]: view every hook as [batch, -1]
        out = t.clone().reshape(n_batch, -1)
        out[rows] = full.reshape(n_batch, -1)[rows]
        return out.reshape(t.shape)

    return hook


def _freeze_pattern_hook(clean: Tensor, keep: list[int]) -> Callable:
    def hook(t: Tensor, hook: Any) -> Tensor:
        out = clean.to(t.device, t.dtype).expand_as(t).clone()
        out[:, keep] = t[:, keep]
        return out

    return hook


def _freeze_hooks(s: _Setup, clean: _Run) -> list[tuple[str, Callable]]:
    """Every head other than the chosen ones, at this layer and after, keeps its clean pattern."""
    out = []
    for layer in range(s.layer, s.model.cfg.n_layers):
        keep = s.heads if layer == s.layer else []
        name = _name(layer, "attn.hook_pattern")
        out.append((name, _freeze_pattern_hook(clean.acts[name], keep)))
    return out


def _pattern_record(s: _Setup, freeze: bool) -> list[str]:
    if not freeze:
        return []
    return [_name(layer, "attn.hook_pattern") for layer in range(s.layer, s.model.cfg.n_layers)]


def _masked(raw: Tensor) -> Tensor:
    return torch.isneginf(raw)


# =========================================================================== results
def _check(
    error: Tensor, scale: Tensor | None, dtype: torch.dtype, tolerance: float | None, what: str
) -> float:
    """Per-entry contract tolerance (or a given absolute one); NaN (masked) entries are skipped."""
    err = error.abs().nan_to_num(0.0)
    if tolerance is not None:
        tol = torch.full_like(err, float(tolerance))
    elif dtype == torch.float64 or scale is None:
        tol = torch.full_like(err, _tolerance(dtype, 1.0))
    else:
        # the row's scale, as in QKAttribution: rounding follows ‖q‖·‖k‖, not |score|
        tol = 1e-4 * scale.nan_to_num(0.0).amax(-1, keepdim=True).expand_as(err).clamp_min(1e-12)
    bad = err > tol
    worst = float(err.max()) if err.numel() else 0.0
    if bad.any():
        i = tuple(int(x) for x in torch.nonzero(bad)[0])
        raise AssertionError(
            f"{what} by up to {worst:.3g} (at [head index, q, k] = {list(i)}: {float(err[i]):.3g} "
            f"> tolerance {float(tol[i]):.3g})"
        )
    return worst


@dataclass
class QKSteering:
    """Chosen heads' raw scores and patterns, and the model's output, before and after steering.

    ``scores_*`` are raw (pre-softcap, ALiBi included; −inf where masked), ``patterns_*`` the
    model's own, both ``[head, q, k]`` over ``heads``. ``predicted_change`` is the attribution's
    exact prediction (NaN where masked). ``logits_*`` are at the ``readout`` positions;
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
    readout: list[int]
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
        return out.masked_fill(_masked(self.scores_before), float("nan"))

    @property
    def error(self) -> Float[Tensor, "h q k"]:
        return self.measured_change - self.predicted_change

    def max_error(self) -> float:
        """max |measured − predicted| over unmasked (head, q, k)."""
        e = self.error.abs()
        e = e[~e.isnan()]
        return float(e.max()) if e.numel() else 0.0

    def check(self, tolerance: float | None = None) -> float:
        """Raise AssertionError unless the measured score changes equal the predicted ones.

        The contract's tolerance: 1e-9 absolute in float64; in float32 1e-4 of each score row's
        scale ‖q‖·‖k‖/attn_scale (steered side included). Returns the largest |error|.
        """
        return _check(self.error, self.scale, self.scores_before.dtype, tolerance, self._what())

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
        hit &= ~_masked(self.scores_before[0])
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
        q = _position("q_pos", q_pos, T)
        keys = torch.nonzero(~_masked(self.scores_before[0, q]))[:, 0]
        out = pd.DataFrame({"k_pos": keys.numpy(), "k_token": [self._tok(int(k)) for k in keys]})
        for i, h in enumerate(self.heads):
            out[f"L{self.layer}H{h} before"] = self.patterns_before[i, q, keys].double().numpy()
            out[f"L{self.layer}H{h} after"] = self.patterns_after[i, q, keys].double().numpy()
        return out

    def _readout_index(self, pos: int | None) -> int:
        if pos is None:
            return 0
        p = _position("pos", pos, len(self.tokens))
        if p not in self.readout:
            raise ValueError(
                f"pos={pos} is not a readout position; logits were kept at {self.readout}"
            )
        return self.readout.index(p)

    def _decode(self, t: int) -> str:
        if self.tokenizer is None:
            return str(t)
        return self.tokenizer.decode([t])

    def predictions(self, k: int = 5, pos: int | None = None) -> pd.DataFrame:
        """Top-``k`` next-token predictions at a readout position, before and after."""
        i = self._readout_index(pos)
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

    def logit_diff(self, token: int, other: int | None = None, pos: int | None = None) -> pd.Series:
        """logit[token] − logit[other] (or logit[token] alone) before and after, at a readout."""
        i = self._readout_index(pos)
        V = self.logits_before.shape[-1]
        for name, t in (("token", token), ("other", other)):
            if t is not None and (not _is_int(t) or not 0 <= int(t) < V):
                raise ValueError(f"{name}={t!r} must be a token id in [0, {V})")

        def value(logits: Tensor) -> float:
            x = float(logits[i, int(token)])
            return x - float(logits[i, int(other)]) if other is not None else x

        b, a = value(self.logits_before), value(self.logits_after)
        return pd.Series({"before": b, "after": a, "change": a - b})

    def loss_change(self, positions: Any = None) -> float:
        """Mean next-token loss change over ``positions`` (None: every position but the last)."""
        n = len(self.loss_before)
        pos = list(range(n)) if positions is None else _positions("positions", positions, n)
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
            q, k = target
            for j, h in enumerate(self.heads):
                row[f"L{self.layer}H{h} prob"] = float(self.patterns_after[j, q, k])
                row[f"L{self.layer}H{h} score"] = float(self.scores_after[j, q, k])
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

    def predictions(self, k: int = 3) -> pd.DataFrame:
        """Long table: (scale, rank) → token and probability after steering."""
        frames = []
        for s, it in zip(self.scales, self.items, strict=True):
            p = it.predictions(k)[["after_token", "after_prob"]].reset_index()
            frames.append(p.assign(scale=s))
        return pd.concat(frames, ignore_index=True).rename(
            columns={"after_token": "token", "after_prob": "prob"}
        )

    def check(self) -> float:
        return max(it.check() for it in self.items)

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
        """Raise AssertionError unless the frozen-norm measurement equals the prediction."""
        what = f"residual edit at layer {self.layer}: frozen-norm score changes differ from the prediction"
        err = self.frozen_change - self.predicted_change
        return _check(err, self.scale, self.scores_before.dtype, tolerance, what)

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


# =========================================================================== the interventions
def _readout(v: Any, n_tokens: int) -> list[int]:
    if _is_int(v):
        return [_position("readout", v, n_tokens)]
    return _positions("readout", v, n_tokens)


def _prediction_scale(q: Tensor, k: Tensor) -> Tensor:
    """‖q‖·‖k‖ per (head, q, k): what float32 rounding of the scores is proportional to."""
    return q.norm(dim=-1)[:, :, None] * k.norm(dim=-1)[:, None, :]


def _qk_steering(
    s: _Setup,
    side: str,
    plan: _Plan,
    clean: _Run,
    run: _Run,
    b: int,
    predicted: Tensor,
    scale: Tensor,
    freeze: bool,
    qk_norm: str,
    readout: list[int],
) -> QKSteering:
    masked = _masked(clean.raw[0])
    return QKSteering(
        layer=s.layer,
        heads=s.heads,
        side=side,
        edits=plan.edits,
        tokens=s.cap.tokens,
        str_tokens=s.cap.str_tokens,
        scores_before=clean.raw[0],
        scores_after=run.raw[b],
        predicted_change=predicted.masked_fill(masked, float("nan")),
        patterns_before=clean.pattern[0],
        patterns_after=run.pattern[b],
        readout=readout,
        logits_before=clean.logits[0],
        logits_after=run.logits[b],
        loss_before=clean.loss[0],
        loss_after=run.loss[b],
        freeze_other_patterns=freeze,
        qk_norm=qk_norm,
        scale=scale,
        tokenizer=getattr(s.model, "tokenizer", None),
    )


def _run_qk(
    s: _Setup,
    side: Side,
    plans: list[_Plan],
    freeze: bool,
    qk_norm: QKNorm,
    readout: list[int],
    batch_size: int,
) -> list[QKSteering]:
    model, qk, layer = s.model, s.qk, s.layer
    heads = s.head_t
    norm_hooks = _qk_norm_hooks(model, layer) if qk_norm == "frozen" else []
    clean = _forward(s, 1, [], [*norm_hooks, *_pattern_record(s, freeze)], readout)

    # The prediction: the other side stays clean, so Δs = q·Δk (or Δq·k), in the frozen maps.
    q_full = full_side(model, qk, "query", heads)
    k_full = full_side(model, qk, "key", heads)
    clean_scale = _prediction_scale(q_full, k_full)
    T = s.n_tokens
    hook_name = _name(layer, "attn.hook_q" if side == "query" else "attn.hook_k")
    out: list[QKSteering] = []
    for start in range(0, len(plans), batch_size):
        chunk = plans[start : start + batch_size]
        deltas = q_full.new_zeros(len(chunk), T, len(s.heads), model.cfg.d_head)
        predicted, scales = [], []
        for b, plan in enumerate(chunk):
            pred = q_full.new_zeros(len(s.heads), T, T)
            # float32 rounding of the steered score scales with the steered side's norm too
            scale = clean_scale.clone()
            if len(plan.positions):
                pre = qk.pre_rotary(side, plan.delta, plan.positions, heads, s.dictionary.space)
                deltas[b, plan.positions] = pre.permute(1, 0, 2)
                fin = qk.project(side, plan.delta, plan.positions, heads, s.dictionary.space)
                if side == "key":
                    pred[:, :, plan.positions] = einops.einsum(q_full, fin, "h q d, h k d -> h q k")
                    scale[:, :, plan.positions] += _prediction_scale(q_full, fin)
                else:
                    pred[:, plan.positions, :] = einops.einsum(fin, k_full, "h q d, h k d -> h q k")
                    scale[:, plan.positions, :] += _prediction_scale(fin, k_full)
            predicted.append(pred.cpu())
            scales.append(scale.cpu())

        def edit(t: Tensor, hook: Any, deltas: Tensor = deltas) -> Tensor:
            out = t.clone()
            out[:, :, heads] += deltas.to(t.device, t.dtype)
            return out

        hooks = [(hook_name, edit)]
        hooks += [(n, _replace_with_clean(clean.acts[n])) for n in norm_hooks]
        if freeze:
            hooks += _freeze_hooks(s, clean)
        run = _forward(s, len(chunk), hooks, [], readout)
        for b, plan in enumerate(chunk):
            out.append(
                _qk_steering(
                    s, side, plan, clean, run, b, predicted[b], scales[b], freeze, qk_norm, readout
                )
            )
    return out


def steer_qk(
    model: Any,
    prompt: Any,
    layer: int,
    heads: int | Sequence[int],
    side: Side = "key",
    features: Mapping[FeatureKey, float] | None = None,
    positions: int | Sequence[int] | None = None,
    freeze_other_patterns: bool = False,
    add: Mapping[FeatureKey, float] | None = None,
    qk_norm: QKNorm = "frozen",
    readout: int | Sequence[int] = -1,
) -> QKSteering:
    """Scale dictionary features inside chosen heads' queries or keys only; measure and predict.

    ``features`` maps a feature (an id, an exact label meaning every feature with it, or an
    ``(id, position)`` tuple) to a scale: its coefficient at each steered position is multiplied
    by it (0 removes it from these heads' keys/queries). ``add`` maps features to a coefficient
    added at the positions (injection, also where the feature is inactive; in units of the
    decomposition's coefficients). ``positions`` (None: all) applies to non-tuple keys.
    Only ``heads`` of ``layer`` see the change, only on ``side``; values, other heads and other
    layers' inputs are untouched. ``readout`` chooses where logits are kept (default: last).
    """
    s = _setup(model, prompt, layer, heads)
    side = _side(side)
    qk_norm = _qk_norm_mode(qk_norm)
    if not isinstance(freeze_other_patterns, bool):
        raise TypeError(f"freeze_other_patterns must be a bool, got {freeze_other_patterns!r}")
    if features is None and add is None:
        raise ValueError("give features={feature_id: scale} and/or add={feature_id: coefficient}")
    T = s.n_tokens
    pos = _positions("positions", positions, T)
    scales, groups = _edit_map("features", features, s.dictionary, pos, T)
    adds, _ = _edit_map("add", add, s.dictionary, pos, T)
    coeffs = _coefficients(s, list(range(T)))
    _check_active(groups, coeffs, s.dictionary)
    plan = _plan(s, scales, adds, coeffs)
    return _run_qk(s, side, [plan], freeze_other_patterns, qk_norm, _readout(readout, T), 1)[0]


def steer_qk_sweep(
    model: Any,
    prompt: Any,
    layer: int,
    heads: int | Sequence[int],
    features: FeatureKey | Sequence[FeatureKey],
    scales: Sequence[float],
    side: Side = "key",
    positions: int | Sequence[int] | None = None,
    freeze_other_patterns: bool = False,
    qk_norm: QKNorm = "frozen",
    readout: int | Sequence[int] = -1,
    target: tuple[int, int] | None = None,
    batch_size: int = 16,
) -> QKSteeringSweep:
    """:func:`steer_qk` with every feature in ``features`` at each scale of ``scales``, batched.

    ``target=(q_pos, k_pos)`` is where the table reports the chosen heads' attention and score;
    by default the first readout position and the key the first chosen head attended to most.
    """
    s = _setup(model, prompt, layer, heads)
    side = _side(side)
    qk_norm = _qk_norm_mode(qk_norm)
    if not isinstance(freeze_other_patterns, bool):
        raise TypeError(f"freeze_other_patterns must be a bool, got {freeze_other_patterns!r}")
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Iterable):
        raise TypeError(f"scales must be a list of numbers, got {type(scales).__name__}")
    scale_list = list(scales)
    if not scale_list or not all(_is_real(x) for x in scale_list):
        raise ValueError(f"scales must be a non-empty list of finite numbers, got {scales!r}")
    if not _is_int(batch_size) or int(batch_size) < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    feats = (
        [features] if isinstance(features, (str, tuple)) or _is_int(features) else list(features)
    )
    if not feats:
        raise ValueError("features is empty; give at least one feature id or label")
    T = s.n_tokens
    pos = _positions("positions", positions, T)
    base, groups = _edit_map("features", dict.fromkeys(feats, 1.0), s.dictionary, pos, T)
    coeffs = _coefficients(s, list(range(T)))
    _check_active(groups, coeffs, s.dictionary)
    plans = [_plan(s, dict.fromkeys(base, float(x)), {}, coeffs) for x in scale_list]
    ro = _readout(readout, T)
    items = _run_qk(s, side, plans, freeze_other_patterns, qk_norm, ro, int(batch_size))
    if target is None:
        q = ro[0]
        k = int(items[0].patterns_before[0, q].argmax())
        target = (q, k)
    else:
        if not isinstance(target, tuple) or len(target) != 2:
            raise TypeError(f"target must be a (q_pos, k_pos) tuple, got {target!r}")
        target = (_position("target q_pos", target[0], T), _position("target k_pos", target[1], T))
    return QKSteeringSweep([float(x) for x in scale_list], items, target)


def steer_resid(
    model: Any,
    prompt: Any,
    layer: int,
    features: Mapping[FeatureKey, float] | Sequence[FeatureKey] | FeatureKey,
    positions: int | Sequence[int] | None = None,
    heads: int | Sequence[int] | None = None,
    add: Mapping[FeatureKey, float] | None = None,
    freeze_other_patterns: bool = False,
    readout: int | Sequence[int] = -1,
) -> ResidSteering:
    """Edit features in the residual stream entering ``layer`` (all heads and later layers see it).

    ``features`` as a list (or one id/label) deletes them (scale 0); as a dict it scales them.
    Reports, for ``heads`` (default all), the raw-score change predicted with norms frozen
    (exact: ``Δq·k + q·Δk + Δq·Δk``), the model's change with ln1/qk-norm scales frozen at the
    layer (equal to the prediction: a check), and the change with live norms, plus the live run's
    logits and losses (``.live``).
    """
    s = _setup(model, prompt, layer, heads)
    if s.dictionary.space != "resid":
        raise ValueError(
            f"the layer-{s.layer} dictionary reconstructs {s.dictionary.hook_name!r}, not the "
            "residual stream; residual edits need an SAE on blocks.L.hook_resid_pre (or "
            "blocks.{L-1}.hook_resid_post). steer_qk works with this dictionary."
        )
    if not isinstance(freeze_other_patterns, bool):
        raise TypeError(f"freeze_other_patterns must be a bool, got {freeze_other_patterns!r}")
    if not isinstance(features, Mapping):
        feats = (
            [features]
            if isinstance(features, (str, tuple)) or _is_int(features)
            else list(features)
        )
        features = dict.fromkeys(feats, 0.0)
    T = s.n_tokens
    pos = _positions("positions", positions, T)
    scales, groups = _edit_map("features", features, s.dictionary, pos, T)
    adds, _ = _edit_map("add", add, s.dictionary, pos, T)
    coeffs = _coefficients(s, list(range(T)))
    _check_active(groups, coeffs, s.dictionary)
    plan = _plan(s, scales, adds, coeffs)
    ro = _readout(readout, T)

    model_, qk, heads_t = s.model, s.qk, s.head_t
    ln_hooks = [n for n in [_name(s.layer, "ln1.hook_scale")] if n in model_.hook_dict]
    norm_hooks = ln_hooks + _qk_norm_hooks(model_, s.layer)
    clean = _forward(s, 1, [], [*norm_hooks, *_pattern_record(s, freeze_other_patterns)], ro)

    # Prediction with every scale frozen: both sides move where the residual moved.
    q_full = full_side(model_, qk, "query", heads_t)
    k_full = full_side(model_, qk, "key", heads_t)
    dq = torch.zeros_like(q_full)
    dk = torch.zeros_like(k_full)
    if len(plan.positions):
        dq[:, plan.positions] = qk.project("query", plan.delta, plan.positions, heads_t, "resid")
        dk[:, plan.positions] = qk.project("key", plan.delta, plan.positions, heads_t, "resid")
    predicted = (
        einops.einsum(dq, k_full, "h q d, h k d -> h q k")
        + einops.einsum(q_full, dk, "h q d, h k d -> h q k")
        + einops.einsum(dq, dk, "h q d, h k d -> h q k")
    )
    predicted = predicted.cpu()
    scale = (_prediction_scale(q_full + dq, k_full + dk) + _prediction_scale(q_full, k_full)).cpu()

    delta = plan.delta

    def edit(t: Tensor, hook: Any) -> Tensor:
        out = t.clone()
        out[:, plan.positions] += delta.to(t.device, t.dtype)
        return out

    # Batch row 0: ln1 / qk-norm scales frozen at the layer (the check); row 1: live.
    frozen_row = torch.tensor([0])
    hooks = [(_name(s.layer, "hook_resid_pre"), edit)]
    hooks += [(n, _replace_with_clean(clean.acts[n], frozen_row)) for n in norm_hooks]
    if freeze_other_patterns:
        hooks += _freeze_hooks(s, clean)
    run = _forward(s, 2, hooks, [], ro)
    masked = _masked(clean.raw[0])
    nan = float("nan")
    live = _qk_steering(
        s, "resid", plan, clean, run, 1, predicted, scale, freeze_other_patterns, "live", ro
    )
    return ResidSteering(
        layer=s.layer,
        heads=s.heads,
        edits=plan.edits,
        tokens=s.cap.tokens,
        str_tokens=s.cap.str_tokens,
        scores_before=clean.raw[0],
        predicted_change=predicted.masked_fill(masked, nan),
        frozen_change=(run.raw[0] - clean.raw[0]).masked_fill(masked, nan),
        live_change=(run.raw[1] - clean.raw[0]).masked_fill(masked, nan),
        patterns_before=clean.pattern[0],
        patterns_after=run.pattern[1],
        live=live,
        scale=scale,
    )
