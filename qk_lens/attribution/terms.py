"""What every term table shares: the float tolerance of the contract, interaction kinds, the
completeness error, and where an attribution came from."""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from torch import Tensor

ALIBI_LABEL = "ALiBi (slope·distance)"
BIAS_KINDS = ("dictionary bias", "attention bias", "attention bias out", "alibi")
INTERACTIONS = ("feature × feature", "error", "bias", "other")


class CompletenessError(AssertionError):
    """The terms of an attribution do not sum to the model's own score."""


def tolerance(dtype: torch.dtype, scale: float) -> float:
    """The contract: 1e-9 absolute in float64; in float32, 1e-4 relative to the score's scale.

    The scale is ‖q‖·‖k‖/attn_scale (+|ALiBi|): what float32 rounding of a dot product is
    proportional to, in the model's own forward as in ours. |score| itself can be far smaller
    when the parts cancel, and then the model's own float32 hook misses the exact score by more
    than 1e-4·|score| (measured: 3.7e-4 on a Gemma-2 pair), so |score| cannot be the yardstick
    (docs/README.md).
    """
    if dtype == torch.float64:
        return 1e-9
    return 1e-4 * max(scale, 1e-12)


def interaction_kind(q_kind: np.ndarray, k_kind: np.ndarray) -> np.ndarray:
    """Each (query part, key part) pair's interaction: one of :data:`INTERACTIONS`."""
    q_kind = np.asarray(q_kind, dtype=object)
    k_kind = np.asarray(k_kind, dtype=object)
    out = np.full(q_kind.shape, "other", dtype=object)
    is_bias = np.isin(q_kind, BIAS_KINDS) | np.isin(k_kind, BIAS_KINDS)
    out[is_bias] = "bias"
    out[(q_kind == "error") | (k_kind == "error")] = "error"
    out[(q_kind == "feature") & (k_kind == "feature")] = "feature × feature"
    return out


@dataclass
class AttributionSource:
    """Where an attribution came from: the model (a weak reference), the prompt, and the function
    that computed it, so that a contrast can compute the same query's other keys alike."""

    model: weakref.ref
    prompt: Any
    compute: Callable[..., Any]

    def resolve(self, model: Any = None, prompt: Any = None) -> tuple[Any, Any]:
        """(model, prompt): the given ones, else the recorded ones."""
        if model is None:
            model = self.model()
            if model is None:
                raise ValueError(
                    "the model this attribution came from no longer exists; pass model="
                )
        return model, self.prompt if prompt is None else prompt


SIGNS = ("abs", "pos", "neg")


def top_entries(
    terms: Float[Tensor, "n_q n_k"], top_k: int, sign: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, column, value) of the ``top_k`` largest terms by |term| (``sign="abs"``), by value
    (``"pos"``) or by −value (``"neg"``)."""
    if sign not in SIGNS:
        raise ValueError(f"sign must be 'abs', 'pos' or 'neg', got {sign!r}")
    flat = terms.reshape(-1)
    key = {"abs": flat.abs(), "pos": flat, "neg": -flat}[sign]
    idx = torch.topk(key, min(top_k, flat.numel())).indices
    rows, cols = np.divmod(idx.numpy(), terms.shape[1])
    return rows, cols, flat[idx].to(torch.float64).numpy()
