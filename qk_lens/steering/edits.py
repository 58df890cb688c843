"""What a steering call changes: the features it names, their coefficients at each position,
and the residual-space vector each edit adds (exactly (s − 1) × the attribution's part)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from qk_lens.arch import SIDES, LayerQK, Side
from qk_lens.attribution.compute import setup as attribution_setup
from qk_lens.bases import DictionaryBasis
from qk_lens.capture import Capture
from qk_lens.checks import check_heads, check_position, is_int, is_real
from qk_lens.state import require_attached

QKNorm = Literal["frozen", "live"]
FeatureKey = int | str | tuple[int | str, int]


def check_side(side: Any) -> Side:
    if side not in SIDES:
        raise ValueError(f"side must be 'query' or 'key', got {side!r}")
    return side


def check_qk_norm(v: Any) -> QKNorm:
    if v not in ("frozen", "live"):
        raise ValueError(f"qk_norm must be 'frozen' or 'live', got {v!r}")
    return v


def feature_ids(d: Any, key: int | str) -> list[int]:
    """A feature id, or every feature whose label is exactly ``key``."""
    if isinstance(key, str):
        ids = sorted(i for i, lab in d.labels.items() if lab == key)
        if not ids:
            raise ValueError(
                f"no feature of the layer-{d.layer} dictionary has the label {key!r}; give feature "
                "ids or an exact label (see model.qk_dictionaries[layer].labels)"
            )
        return ids
    if not is_int(key):
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


def edit_map(
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
        if not is_real(value):
            raise TypeError(f"{name}[{key!r}] must be a finite real number, got {value!r}")
        if isinstance(key, tuple):
            if len(key) != 2:
                raise ValueError(f"{name} key {key!r}: a tuple key must be (feature, position)")
            pos = [check_position(f"{name} key {key!r} position", key[1], n_tokens)]
            key = key[0]
        else:
            pos = positions
        named = [(f, p) for f in feature_ids(d, key) for p in pos]
        out.update(dict.fromkeys(named, float(value)))
        groups.append((user_key, named))
    return out, groups


@dataclass
class Setup:
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


def setup(model: Any, prompt: Any, layer: Any, heads: Any) -> Setup:
    """The validated model, layer, capture, frozen maps, dictionary and heads of one call."""
    require_attached(model)
    layer, cap, qk, qb, _ = attribution_setup(model, prompt, layer, None, None, "dictionary")
    if not isinstance(qb, DictionaryBasis):
        raise TypeError("steering needs a dictionary basis for the layer")
    if heads is None:
        head_list = list(range(qk.n_heads))
    else:
        head_list = check_heads(heads, qk.n_heads)
    return Setup(model, layer, cap, qk, qb.dictionary, head_list)


@dataclass
class EditPlan:
    """One condition: per edited (feature, position), the coefficient change, and its vectors."""

    edits: pd.DataFrame  # feature, label, position, coefficient, scale, add, delta
    positions: Int[Tensor, "n_pos"]  # positions with any edit
    delta: Float[Tensor, "n_pos d_model"]  # Σ_f Δc_f · W_dec[f], in the dictionary's space


def coefficients(s: Setup, positions: list[int]) -> dict[tuple[int, int], tuple[float, Tensor]]:
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


def plan_edits(
    s: Setup,
    scales: dict[tuple[int, int], float],
    adds: dict[tuple[int, int], float],
    coeffs: dict[tuple[int, int], tuple[float, Tensor]],
) -> EditPlan:
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
    return EditPlan(edits, torch.tensor(positions, dtype=torch.long), delta)


class FeatureNotActive(ValueError):
    """A steered feature is not active where it is steered: scaling it would change nothing."""


def check_active(groups: KeyGroups, coeffs: dict, d: Any) -> None:
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
        raise FeatureNotActive(
            f"{what} is not active at the steered position(s) {pos[:12]} ({where}), so scaling "
            f"changes nothing; steer where it is active, or inject with add={{{feats[0]}: "
            "coefficient}"
        )
