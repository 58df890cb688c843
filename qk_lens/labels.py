"""Feature labels: automatic ones from probe data, and a user's own (dicts, files, Neuronpedia).

:func:`label_features` names each SAE feature by the simplest description that predicts where it
fires: ``current token = X``, ``previous token = X`` or ``position = p``. Every candidate
description D is scored against the feature's activations on the probe tokens by

* precision(D) = sum of the feature's activation over tokens where D holds / its total activation,
* recall(D) = share of the tokens where D holds on which the feature is active (> 0),
* score(D) = precision (default; recall breaks ties) or F1, the harmonic mean of the two.

:func:`load_labels` reads labels from a mapping, a :class:`LabelSet`, or a file (a JSON object,
a :meth:`LabelSet.save` file, a Neuronpedia explanations export, or JSON Lines of one).
"""

from __future__ import annotations

import json
import numbers
import operator
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from os import PathLike
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from qk_lens.capture import recorder
from qk_lens.files import write_text

if TYPE_CHECKING:
    from qk_lens.dictionaries import Dictionary

__all__ = [
    "DESCRIPTION_KINDS",
    "ROLE",
    "TOKEN_CLASS",
    "LABEL_KINDS",
    "FeatureLabel",
    "LabelSet",
    "label_dictionary",
    "label_features",
    "load_labels",
]

# Kinds of description label_features tries, in the default tie-break order.
DESCRIPTION_KINDS = ("current token", "previous token", "position")
# a caller's own annotation of probe tokens (e.g. "antonyms: the word asked about"), tried last
ROLE = "role"
# a caller's classes of tokens (e.g. "antonym word": big, small, hot, ...): for a feature spread
# over a class's words that no single word, position or role describes
TOKEN_CLASS = "token class"
LABEL_KINDS = (*DESCRIPTION_KINDS, ROLE, TOKEN_CLASS, "unclear", "dead")

CRITERIA = ("precision", "f1")
# Weight of recall when ranking by precision: only decides between (near-)equal precisions.
_RECALL_TIEBREAK = 1e-3
_LABELSET_FORMAT = "qk_lens.LabelSet"
_LABELSET_VERSION = 1
# Scores this close count as tied, so float rounding cannot override the caller's kind order.
_TIE_TOL = 1e-12
# Elements per [n_values, block] float64 buffer: bounds memory for large vocabularies and d_sae.
_BLOCK_ELEMENTS = 1 << 22
_FORMATS = (
    'a JSON object {"<feature id>": "<description>", ...}, a LabelSet file (LabelSet.save), '
    'a Neuronpedia explanations export (a JSON list of objects with "index" and "description"), '
    "or JSON Lines of such objects (.jsonl)"
)
_INT_STR = re.compile(r"[+-]?\d+")


@dataclass(frozen=True)
class FeatureLabel:
    """The best description of one feature, with how well it fits the probe data."""

    feature: int
    label: str
    kind: str
    value: str | int | None
    score: float
    precision: float
    recall: float
    n_active: int


@dataclass
class LabelSet:
    """One :class:`FeatureLabel` per feature of a dictionary; ``labels[i].feature == i``."""

    labels: list[FeatureLabel]
    source: str = "probe"

    def __post_init__(self) -> None:
        for i, lab in enumerate(self.labels):
            if not isinstance(lab, FeatureLabel):
                raise TypeError(f"labels[{i}] must be a FeatureLabel, got {type(lab).__name__}")
            if lab.feature != i:
                raise ValueError(f"labels[{i}] describes feature {lab.feature}; expected {i}")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, feature: int) -> FeatureLabel:
        return self.labels[operator.index(feature)]

    def to_dict(self) -> dict[int, str]:
        """Feature id -> label, what :class:`~qk_lens.dictionaries.Dictionary` shows in tables."""
        return {lab.feature: lab.label for lab in self.labels}

    def frame(self) -> pd.DataFrame:
        """One row per feature with every field of :class:`FeatureLabel`."""
        cols = [f.name for f in fields(FeatureLabel)]
        return pd.DataFrame([asdict(lab) for lab in self.labels], columns=cols)

    def save(self, path: str | PathLike[str]) -> Path:
        """Write every field as JSON (readable by :meth:`load` and :func:`load_labels`); returns
        the path written."""
        data = {
            "format": _LABELSET_FORMAT,
            "version": _LABELSET_VERSION,
            "source": self.source,
            "labels": [asdict(lab) for lab in self.labels],
        }
        return write_text(path, json.dumps(data, indent=1))

    @classmethod
    def load(cls, path: str | PathLike[str]) -> LabelSet:
        """Read a file written by :meth:`save`; ValueError naming ``path`` if it is not one."""
        path = Path(path)
        data = _parse_json(_read_text(path))
        if data is _NOT_JSON:
            raise ValueError(f"{path} is not valid JSON, so not a LabelSet file (LabelSet.save)")
        return cls._from_json(data, path)

    @classmethod
    def _from_json(cls, data: Any, path: Path) -> LabelSet:
        def bad(why: str) -> ValueError:
            return ValueError(f"{path} is not a valid LabelSet file (LabelSet.save): {why}")

        if not isinstance(data, dict) or data.get("format") != _LABELSET_FORMAT:
            raise bad(f"expected a JSON object with format={_LABELSET_FORMAT!r}")
        if data.get("version") != _LABELSET_VERSION:
            raise bad(f"unsupported version {data.get('version')!r}")
        source, entries = data.get("source"), data.get("labels")
        if not isinstance(source, str) or not isinstance(entries, list):
            raise bad("'source' must be a string and 'labels' a list")
        names = {f.name for f in fields(FeatureLabel)}
        labels = []
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or set(e) != names:
                raise bad(f"labels[{i}] must be an object with exactly the keys {sorted(names)}")
            if not _is_int(e["feature"]) or e["feature"] != i:
                raise bad(f"labels[{i}] has feature {e['feature']!r}; expected {i}")
            if not isinstance(e["label"], str) or e["kind"] not in LABEL_KINDS:
                raise bad(f"labels[{i}] needs a string label and a kind in {LABEL_KINDS}")
            if not (e["value"] is None or isinstance(e["value"], str) or _is_int(e["value"])):
                raise bad(f"labels[{i}] has value {e['value']!r}; expected a string, int or null")
            for key in ("score", "precision", "recall"):
                v = e[key]
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                    raise bad(f"labels[{i}] has {key} {v!r}; expected a number in [0, 1]")
            if not _is_int(e["n_active"]) or e["n_active"] < 0:
                raise bad(f"labels[{i}] has n_active {e['n_active']!r}; expected an int >= 0")
            labels.append(
                FeatureLabel(**{**e, **{k: float(e[k]) for k in ("score", "precision", "recall")}})
            )
        return cls(labels=labels, source=source)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# ---------------------------------------------------------------------------------------------
# Automatic labels
# ---------------------------------------------------------------------------------------------


@dataclass
class _Candidates:
    """The values one kind of description can take on the probe, and which tokens hold each."""

    kind: str
    values: Int[Tensor, " n_values"]  # sorted, so ties go to the smallest value
    rows: Int[Tensor, " n_valid"] | None  # probe tokens the kind applies to; None: all
    value_of_row: Int[Tensor, " n_valid"]  # index into values
    n_holds: Float[Tensor, " n_values"]  # tokens where "kind = value" holds

    @classmethod
    def build(
        cls, kind: str, per_token: Int[Tensor, " n_tok"], valid: Bool[Tensor, " n_tok"]
    ) -> _Candidates:
        rows = None if bool(valid.all()) else valid.nonzero().squeeze(-1)
        held = per_token if rows is None else per_token[rows]
        values, inverse = torch.unique(held, sorted=True, return_inverse=True)
        n_holds = torch.bincount(inverse, minlength=len(values)).to(torch.float64)
        return cls(kind, values, rows, inverse, n_holds)

    def best(
        self,
        mass: Float[Tensor, "n_tok block"],
        active: Float[Tensor, "n_tok block"],
        total: Float[Tensor, " block"],
        criterion: str = "precision",
    ) -> tuple[Float[Tensor, "4 block"], Int[Tensor, " block"]]:
        """(score, precision, recall, rank) of each feature's best value of this kind (``rank``
        orders descriptions across kinds), and that value."""
        n_values, block = len(self.values), mass.shape[1]
        if n_values == 0:  # e.g. "previous token" on one-token sequences: nothing to describe
            stats = torch.zeros(4, block, dtype=mass.dtype, device=mass.device)
            stats[3] = -1.0  # below any real rank, so another kind always wins
            return stats, torch.full((block,), -1, dtype=torch.long, device=mass.device)
        # Scatter-add = one-hot[n_values, n_tok] @ acts[n_tok, block], without the one-hot.
        if self.rows is not None:
            mass, active = mass[self.rows], active[self.rows]
        on_value = mass.new_zeros(n_values, block).index_add_(0, self.value_of_row, mass)
        hits = mass.new_zeros(n_values, block).index_add_(0, self.value_of_row, active)
        precision = on_value / total.clamp(min=torch.finfo(mass.dtype).tiny)
        recall = hits / self.n_holds[:, None]
        denom = precision + recall
        if criterion == "f1":
            score = torch.where(denom > 0, 2 * precision * recall / denom.clamp(min=1e-300), 0.0)
            rank = score
        else:  # precision; among (near-)equal precisions the description covering more wins
            score = precision
            rank = precision + _RECALL_TIEBREAK * recall
        idx = rank.argmax(dim=0)  # first maximum: the smallest value wins a tie
        pick = idx[None]
        stats = torch.stack(
            [
                score.gather(0, pick)[0],
                precision.gather(0, pick)[0],
                recall.gather(0, pick)[0],
                rank.gather(0, pick)[0],
            ]
        )
        return stats, self.values[idx]


def _class_table(
    token_classes: Any, token_names: Sequence[str]
) -> tuple[list[str], Int[Tensor, " n_names"]]:
    """(class names, each token id's class index or -1) from ``{class: [word, ...]}``."""
    if not isinstance(token_classes, Mapping) or not token_classes:
        raise TypeError(
            "token_classes must be a non-empty dict {class name: [word, ...]}, got "
            f"{token_classes!r}"
        )
    index = {str(name): i for i, name in enumerate(token_names)}
    table = torch.full((len(token_names),), -1, dtype=torch.long)
    names = []
    for c, (name, words) in enumerate(token_classes.items()):
        if isinstance(words, str) or not isinstance(words, Iterable):
            raise TypeError(f"token_classes[{name!r}] must be a list of words, got {words!r}")
        words = list(words)
        if not words:
            raise ValueError(f"token_classes[{name!r}] is empty; give at least one word")
        unknown = [w for w in words if w not in index]
        if unknown:
            raise ValueError(
                f"token_classes[{name!r}] has words that are no token: {unknown[:5]} (tokens "
                f"are token_names, e.g. {list(token_names)[:5]})"
            )
        ids = torch.tensor([index[w] for w in words], dtype=torch.long)
        free = table[ids] < 0  # a word in several classes belongs to the first
        table[ids[free]] = c
        names.append(str(name))
    return names, table


def _check_ids(name: str, t: Any, n_tok: int, low: int) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {t.dtype}")
    if t.shape != (n_tok,):
        raise ValueError(f"{name} must have shape (n_tok={n_tok},), got {tuple(t.shape)}")
    if n_tok and int(t.min()) < low:
        raise ValueError(f"{name} has id {int(t.min())}; ids must be >= {low}")
    return t.to(torch.long)


def label_features(
    acts: Float[Tensor, "n_tok d_sae"],
    tokens: Int[Tensor, " n_tok"],
    prev_tokens: Int[Tensor, " n_tok"],
    positions: Int[Tensor, " n_tok"],
    token_names: Sequence[str],
    min_score: float = 0.5,
    kinds: Sequence[str] | None = None,
    criterion: str = "precision",
    roles: Int[Tensor, " n_tok"] | None = None,
    role_names: Sequence[str] | None = None,
    token_classes: Mapping[str, Sequence[str]] | None = None,
) -> LabelSet:
    """Label every feature by its best-scoring description on the probe tokens.

    ``criterion="precision"`` (default) scores a description by the share of the feature's
    activation it accounts for, ties going to the description that covers more of its tokens
    (recall): a feature that fires only on some occurrences of "previous token = fox" (dictionaries
    split features) is still about fox. ``criterion="f1"`` scores by the harmonic mean of
    precision and recall instead, so split features come out "unclear".

    ``acts`` holds the feature activations of each probe token (<= 0 counts as inactive);
    ``prev_tokens`` is -1 where a token has no predecessor. The best description over ``kinds``
    (ties go to the earlier kind, then the smaller value) becomes the label when its score is at
    least ``min_score``; otherwise the label is ``"unclear"`` with that best score, precision and
    recall kept. A feature never active on the probe is ``"dead"``.

    ``roles`` (with ``role_names``) annotates probe tokens with what they are in their text
    (an index into ``role_names``, -1 for none): the description ``role = <name>`` then competes
    too (``kinds`` defaults to :data:`DESCRIPTION_KINDS`, plus ``"role"`` when roles are given).

    ``token_classes`` maps a class name to its words (``{"antonym word": ["big", "small", ...]}``,
    matched against ``token_names``; a word in several classes belongs to the first): the
    description ``token class = <name>`` then describes a feature that no other kind describes
    (best score below ``min_score``: no single word, previous word, position or role holds
    enough of it), where the class does.
    """
    optional = ((ROLE,) if roles is not None else ()) + (
        (TOKEN_CLASS,) if token_classes is not None else ()
    )
    if kinds is None:
        kinds = (*DESCRIPTION_KINDS, *optional)
    if not isinstance(acts, Tensor):
        raise TypeError(f"acts must be a torch.Tensor, got {type(acts).__name__}")
    if acts.ndim != 2:
        raise ValueError(f"acts must have shape (n_tok, d_sae), got {tuple(acts.shape)}")
    if acts.is_sparse:
        acts = acts.to_dense()
    if not acts.is_floating_point():
        acts = acts.to(torch.float64)
    n_tok, d_sae = acts.shape
    device = acts.device
    tokens = _check_ids("tokens", tokens, n_tok, 0).to(device)
    prev_tokens = _check_ids("prev_tokens", prev_tokens, n_tok, -1).to(device)
    positions = _check_ids("positions", positions, n_tok, 0).to(device)
    if isinstance(kinds, str):
        kinds = (kinds,)
    kinds = tuple(kinds)
    allowed = (*DESCRIPTION_KINDS, *optional)
    if not kinds or len(set(kinds)) != len(kinds) or not set(kinds) <= set(allowed):
        raise ValueError(
            f"kinds must be distinct names from {allowed}, got {list(kinds)}"
            + ("" if roles is not None else " ('role' needs roles=)")
            + ("" if token_classes is not None else " ('token class' needs token_classes=)")
        )
    if roles is not None:
        roles = _check_ids("roles", roles, n_tok, -1).to(device)
        if role_names is None or isinstance(role_names, str):
            raise TypeError("roles= needs role_names=, a list of the roles' names")
        role_names = [str(r) for r in role_names]
        if n_tok and int(roles.max()) >= len(role_names):
            raise ValueError(
                f"role id {int(roles.max())} has no name: role_names has {len(role_names)} entries"
            )
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    if not isinstance(min_score, numbers.Real) or not 0 <= float(min_score) <= 1:
        raise ValueError(f"min_score must be a number in [0, 1], got {min_score!r}")
    if n_tok and not bool(torch.isfinite(acts).all()):
        raise ValueError("acts must be finite (it contains NaN or inf)")
    if n_tok:
        max_id = max(int(tokens.max()), int(prev_tokens.max()))
        if max_id >= len(token_names):
            raise ValueError(
                f"token id {max_id} has no name: token_names has {len(token_names)} entries"
            )

    per_token = {
        "current token": (tokens, torch.ones_like(tokens, dtype=torch.bool)),
        "previous token": (prev_tokens, prev_tokens >= 0),
        "position": (positions, torch.ones_like(positions, dtype=torch.bool)),
    }
    if roles is not None:
        per_token[ROLE] = (roles, roles >= 0)
    class_names: list[str] = []
    if token_classes is not None:
        class_names, class_of_token = _class_table(token_classes, token_names)
        classes = class_of_token.to(device)[tokens]
        per_token[TOKEN_CLASS] = (classes, classes >= 0)
    cands = [_Candidates.build(k, *per_token[k]) for k in kinds]
    class_kind = kinds.index(TOKEN_CLASS) if TOKEN_CLASS in kinds else None

    score = np.zeros(d_sae)
    precision = np.zeros(d_sae)
    recall = np.zeros(d_sae)
    kind_idx = np.zeros(d_sae, dtype=np.int64)
    value = np.zeros(d_sae, dtype=np.int64)
    n_active = np.zeros(d_sae, dtype=np.int64)
    widest = max([n_tok, 1] + [len(c.values) for c in cands])
    block = max(1, _BLOCK_ELEMENTS // widest)
    # Blocks of features bound memory; within a block every feature and token is vectorized.
    for lo in range(0, d_sae, block):
        hi = min(lo + block, d_sae)
        mass = acts[:, lo:hi].to(torch.float64).clamp(min=0)
        active = (mass > 0).to(torch.float64)
        total = mass.sum(dim=0)
        per_kind = [c.best(mass, active, total, criterion) for c in cands]
        stats = torch.stack([s for s, _ in per_kind])  # [n_kinds, 4, block]
        values = torch.stack([v for _, v in per_kind])  # [n_kinds, block]
        if class_kind is not None:
            # a class describes a feature only where nothing narrower does: its precision is at
            # least any of its words', so a feature mostly on one word would otherwise get it
            others = torch.cat([stats[:class_kind, 0], stats[class_kind + 1 :, 0]])
            narrower = (others.max(dim=0).values >= min_score) if len(others) else None
            if narrower is not None:
                stats[class_kind, 3] = torch.where(narrower, -1.0, stats[class_kind, 3])
        top = stats[:, 3].max(dim=0).values
        # First kind (in the caller's order) within rounding of the top rank.
        k = (stats[:, 3] >= top - _TIE_TOL).to(torch.int8).argmax(dim=0)
        chosen = stats.gather(0, k[None, None, :].expand(1, 4, hi - lo))[0, :3]
        chosen = chosen.clamp(0, 1)  # summation rounding can land a hair above 1
        score[lo:hi], precision[lo:hi], recall[lo:hi] = chosen.cpu().numpy()
        kind_idx[lo:hi] = k.cpu().numpy()
        value[lo:hi] = values.gather(0, k[None])[0].cpu().numpy()
        n_active[lo:hi] = active.sum(dim=0).to(torch.int64).cpu().numpy()

    labels = []
    for f in range(d_sae):
        kind = kinds[kind_idx[f]]
        if n_active[f] == 0:
            labels.append(FeatureLabel(f, "dead", "dead", None, 0.0, 0.0, 0.0, 0))
            continue
        s, p, r = float(score[f]), float(precision[f]), float(recall[f])
        if s < min_score or value[f] < 0:
            labels.append(FeatureLabel(f, "unclear", "unclear", None, s, p, r, int(n_active[f])))
            continue
        if kind == ROLE:
            v: str | int = role_names[value[f]]
        elif kind == TOKEN_CLASS:
            v = class_names[value[f]]
        elif kind == "position":
            v = int(value[f])
        else:
            v = str(token_names[value[f]])
        labels.append(FeatureLabel(f, f"{kind} = {v}", kind, v, s, p, r, int(n_active[f])))
    return LabelSet(labels=labels, source="probe")


def label_dictionary(
    model: Any,
    dictionary: Dictionary,
    tokens: Int[Tensor, "batch seq"],
    min_score: float = 0.5,
    batch_size: int = 64,
    kinds: Sequence[str] | None = None,
    criterion: str = "precision",
    roles: Int[Tensor, "batch seq"] | None = None,
    role_names: Sequence[str] | None = None,
    token_classes: Mapping[str, Sequence[str]] | None = None,
) -> LabelSet:
    """Label ``dictionary``'s features from its activations on the probe ``tokens``
    (``roles``: each probe token's role; ``token_classes``: classes of words; as in
    :func:`label_features`).

    Runs ``model`` (a TransformerLens model) on ``tokens`` in batches, encodes the activations at
    ``dictionary.hook_name`` with the SAE and calls :func:`label_features`. Token names come from
    ``model.tokenizer`` when there is one, else the ids as strings. Memory: the activations of all
    probe tokens are held at once, ``batch * seq * d_sae`` floats.
    """
    if not isinstance(tokens, Tensor) or tokens.is_floating_point() or tokens.ndim != 2:
        raise ValueError("tokens must be an integer tensor of shape (batch, seq)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    d_vocab = int(model.cfg.d_vocab)
    if tokens.numel() and not (0 <= int(tokens.min()) and int(tokens.max()) < d_vocab):
        raise ValueError(f"tokens must be ids in [0, d_vocab={d_vocab})")
    tokens = tokens.to(torch.long)
    sae = dictionary.sae
    chunks = []
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch_size):
            batch = tokens[start : start + batch_size].to(model.cfg.device)
            # The hook lies at or before the dictionary's layer: later blocks are not needed.
            # (recorder finds it by any of its names: SAELens's bridge knows only canonical ones)
            acts_of, record = recorder(model, [dictionary.hook_name])
            model.run_with_hooks(
                batch, fwd_hooks=record, stop_at_layer=dictionary.layer + 1, return_type=None
            )
            x = acts_of[dictionary.hook_name]
            x = x.reshape(-1, x.shape[-1]).to(device=sae.device, dtype=sae.dtype)
            acts = dictionary.encode(x)
            chunks.append(acts)
    acts = torch.cat(chunks) if chunks else torch.zeros(0, dictionary.d_sae)

    # Predecessors within each sequence only; position 0 has none.
    prev = torch.cat([torch.full_like(tokens[:, :1], -1), tokens[:, :-1]], dim=1)
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    return label_features(
        acts,
        tokens.reshape(-1),
        prev.reshape(-1),
        positions.reshape(-1),
        _token_names(model, d_vocab),
        min_score=min_score,
        kinds=kinds,
        criterion=criterion,
        roles=None if roles is None else _check_roles(roles, tokens).reshape(-1),
        role_names=role_names,
        token_classes=token_classes,
    )


def _check_roles(roles: Any, tokens: Tensor) -> Tensor:
    if not isinstance(roles, Tensor) or roles.shape != tokens.shape:
        shape = tuple(roles.shape) if isinstance(roles, Tensor) else type(roles).__name__
        raise ValueError(
            f"roles must be a tensor shaped like tokens {tuple(tokens.shape)}, got {shape}"
        )
    return roles


def _token_names(model: Any, d_vocab: int) -> list[str]:
    names = [str(i) for i in range(d_vocab)]
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is not None:
        # A padded d_vocab can exceed the tokenizer's vocabulary: those ids keep their number.
        n = min(d_vocab, len(tokenizer))
        for i, t in enumerate(tokenizer.convert_ids_to_tokens(list(range(n)))):
            if t is not None:
                names[i] = str(t)
    return names


# ---------------------------------------------------------------------------------------------
# A user's own labels
# ---------------------------------------------------------------------------------------------


def load_labels(source: Any, d_sae: int | None = None) -> dict[int, str]:
    """Feature id -> description from a mapping, a :class:`LabelSet` or a label file.

    A file may be a JSON object ``{"123": "description", ...}``, a :meth:`LabelSet.save` file, a
    Neuronpedia explanations export (a JSON list of objects with ``"index"`` and
    ``"description"``; the first explanation of an index wins, descriptions are stripped of
    surrounding whitespace), or JSON Lines of such objects. With ``d_sae``, a feature id outside
    ``[0, d_sae)`` is a ValueError.
    """
    if isinstance(source, LabelSet):
        labels = source.to_dict()
    elif isinstance(source, Mapping):
        labels = {
            _feature_id(k, f"key {k!r} of the labels mapping"): str(v) for k, v in source.items()
        }
    elif isinstance(source, (str, PathLike)):
        labels = _read_label_file(Path(source))
    else:
        raise TypeError(
            "labels must be a mapping feature id -> description, a LabelSet or a path to a "
            f"label file, got {type(source).__module__}.{type(source).__qualname__}"
        )
    if d_sae is not None:
        outside = sorted(i for i in labels if not 0 <= i < d_sae)
        if outside:
            more = f" (and {len(outside) - 1} more)" if len(outside) > 1 else ""
            raise ValueError(
                f"label for feature {outside[0]}{more} is outside [0, d_sae={d_sae}): these "
                "labels belong to a different SAE"
            )
    return labels


def _feature_id(key: Any, where: str) -> int:
    """A non-negative int feature id from an int or a decimal string; ValueError naming ``where``."""
    if isinstance(key, str) and _INT_STR.fullmatch(key.strip()):
        fid = int(key)
    elif not isinstance(key, (bool, str, float)) and hasattr(key, "__index__"):
        fid = operator.index(key)
    else:
        raise ValueError(f"{where}: feature id {key!r} is not an integer")
    if fid < 0:
        raise ValueError(f"{where}: feature id {fid} is negative")
    return fid


class _NotJson:
    """Marks text that does not parse (JSON's own ``null`` is a valid parse)."""


_NOT_JSON = _NotJson()


def _read_text(path: Path) -> str | None:
    """The file's text, None if it is not UTF-8; FileNotFoundError / ValueError naming it."""
    if not path.exists():
        raise FileNotFoundError(f"label file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def _parse_json(text: str | None) -> Any:
    if text is None:
        return _NOT_JSON
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return _NOT_JSON


def _parse_jsonl(text: str | None) -> Any:
    if text is None:
        return _NOT_JSON
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError:
        return _NOT_JSON


def _read_label_file(path: Path) -> dict[int, str]:
    text = _read_text(path)
    if path.suffix.lower() == ".jsonl":
        data = _parse_jsonl(text)
    else:
        data = _parse_json(text)
        if data is _NOT_JSON:
            data = _parse_jsonl(text)  # JSON Lines saved under another name

    def unknown(why: str) -> ValueError:
        return ValueError(f"{path} is not a label file ({why}); accepted formats: {_FORMATS}")

    if isinstance(data, _NotJson):
        raise unknown("not JSON or JSON Lines")
    if isinstance(data, dict) and data.get("format") == _LABELSET_FORMAT:
        return LabelSet._from_json(data, path).to_dict()
    if isinstance(data, dict):
        if not all(isinstance(v, str) for v in data.values()):
            raise unknown("a JSON object whose values are not all strings")
        return {_feature_id(k, f"{path}: key {k!r}"): v for k, v in data.items()}
    if isinstance(data, list):
        labels: dict[int, str] = {}
        for i, e in enumerate(data):
            if not isinstance(e, dict) or "index" not in e or "description" not in e:
                raise unknown(f'entry {i} is not an object with "index" and "description"')
            where = f"{path}: entry {i} {_short(e)}"
            if not isinstance(e["description"], str):
                raise ValueError(f"{where}: description must be a string")
            # Neuronpedia can hold several explanations of one feature: keep the first.
            labels.setdefault(_feature_id(e["index"], where), e["description"].strip())
        return labels
    raise unknown(f"top-level JSON {type(data).__name__}")


def _short(entry: dict[str, Any]) -> str:
    text = json.dumps({k: entry[k] for k in ("index", "description") if k in entry})
    return text if len(text) <= 120 else text[:117] + "..."
