"""Bases: the residual stream entering a layer, at each position, written exactly as a sum of parts.

A basis yields a :class:`PartsBatch` for a set of positions: residual-space vectors padded to a
common number of slots, a validity mask and one metadata row per valid part. Two bases ship:
a SAELens dictionary (features, dictionary bias, error) and the upstream split (token embedding,
positional embedding, each earlier head, each earlier attention bias and MLP). Each is valid only
because its parts sum to the residual the layer reads; the tests hold them to that.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from torch.nn.utils.rnn import pad_sequence

from qk_lens.arch import arch_of
from qk_lens.capture import Capture
from qk_lens.dictionaries import Decomposition, Dictionary

PART_COLUMNS = ["kind", "layer", "head", "position", "feature", "activation", "label"]


@dataclass
class PartsBatch:
    """Parts of the residual at several positions, padded to ``n_slots`` per position."""

    positions: Int[Tensor, "n_pos"]
    vectors: Float[Tensor, "n_pos slot d_model"]
    valid: Bool[Tensor, "n_pos slot"]
    meta: Meta  # one entry per valid (pos, slot), in row-major (pos, slot) order
    space: str  # "resid" or "normalized": what the vectors sum to
    # Optional factorization vectors[p, s] = coeffs[p, s] · rows[row_ids[p, s]] for the slots with
    # row_ids ≥ 0 (a dictionary's features): a projection can then map each distinct decoder row
    # once, however many positions use it.
    rows: Float[Tensor, "n_rows d_model"] | None = None
    row_ids: Int[Tensor, "n_pos slot"] | None = None
    coeffs: Float[Tensor, "n_pos slot"] | None = None

    @property
    def n_slots(self) -> int:
        return self.vectors.shape[1]


Meta = dict[str, np.ndarray]  # one array per column of PART_COLUMNS, one entry per part


def part_meta(
    kind: np.ndarray | str,
    layer: np.ndarray | int,
    head: np.ndarray | int,
    position: np.ndarray,
    feature: np.ndarray | int,
    activation: np.ndarray | float,
    label: list[str] | np.ndarray | str,
) -> Meta:
    """Part metadata as numpy columns (DataFrames are built only when a user asks for one)."""
    n = len(position)
    dtypes = (object, np.int64, np.int64, np.int64, np.int64, np.float64, object)
    values = (kind, layer, head, position, feature, activation, label)
    out = {}
    for name, v, dt in zip(PART_COLUMNS, values, dtypes, strict=True):
        if isinstance(v, str) or np.ndim(v) == 0:
            arr = np.empty(n, dtype=dt)
            arr[:] = v
        else:
            arr = np.asarray(v, dtype=dt)
        out[name] = arr
    return out


def concat_meta(parts: list[Meta]) -> Meta:
    return {c: np.concatenate([m[c] for m in parts]) for c in PART_COLUMNS}


def take_meta(meta: Meta, idx: np.ndarray | slice) -> Meta:
    return {c: v[idx] for c, v in meta.items()}


def meta_frame(meta: Meta) -> pd.DataFrame:
    return pd.DataFrame(meta, columns=PART_COLUMNS)


class Basis(Protocol):
    """A way of writing the residual entering a layer as a sum of parts (at each position)."""

    @property
    def key(self) -> tuple: ...

    def parts(
        self, model: Any, cap: Capture, layer: int, positions: Int[Tensor, "n"]
    ) -> PartsBatch: ...


class DictionaryBasis:
    """Active dictionary features f_i·d_i, the dictionary bias and the error, per position."""

    def __init__(self, dictionary: Dictionary) -> None:
        self.dictionary = dictionary

    @property
    def key(self) -> tuple:
        return ("dictionary", id(self.dictionary))

    def parts(
        self, model: Any, cap: Capture, layer: int, positions: Int[Tensor, "n"]
    ) -> PartsBatch:
        d = self.dictionary
        dt = arch_of(model).dtype
        if len(positions) != 1:
            return self._parts(d, dt, cap, layer, positions)
        # One position (a single pair's side): kept on the capture, labels looked up afresh.
        memo = cap.derived.setdefault(("parts", self.key, layer, dt), {})
        p = int(positions[0])
        if p not in memo:
            memo[p] = self._parts(d, dt, cap, layer, positions)
        pb = memo[p]
        meta = dict(pb.meta)
        feats = meta["kind"] == "feature"
        labels = meta["label"].copy()
        labels[feats] = d.labels_of(meta["feature"][feats])
        meta["label"] = labels
        return replace(pb, meta=meta)

    def _parts(
        self, d: Dictionary, dt: torch.dtype, cap: Capture, layer: int, positions: Tensor
    ) -> PartsBatch:
        x = cap.get(d.capture_hook).to(dt)[positions]
        dec = self.decompose(cap, layer, x, positions)
        W_dec = d.decoder(dt, x.device)
        n_pos, k = dec.feature_ids.shape
        active = dec.feature_ids >= 0
        safe_ids = dec.feature_ids.clamp(min=0)
        feat_vecs = dec.coeffs[..., None] * W_dec[safe_ids]  # [n_pos, k, d_model]
        vectors = torch.cat([feat_vecs, dec.bias[:, None], dec.error[:, None]], dim=1)
        valid = torch.cat([active, torch.ones(n_pos, 2, dtype=torch.bool)], dim=1)

        pos_np = positions.numpy()
        ids = dec.feature_ids.numpy()
        acts = dec.activations.to(torch.float64).numpy()
        act_mask = active.numpy()
        f_pos = np.broadcast_to(pos_np[:, None], ids.shape)[act_mask]
        f_ids = ids[act_mask]
        f_meta = part_meta(
            np.full(len(f_ids), "feature", dtype=object),
            layer,
            -1,
            f_pos,
            f_ids,
            acts[act_mask],
            d.labels_of(f_ids),
        )
        # Row-major (pos, slot) order: each position's features, then its bias, then its error.
        order = np.argsort(
            np.concatenate([np.nonzero(act_mask)[0] * (k + 2) + np.nonzero(act_mask)[1],
                            np.repeat(np.arange(n_pos) * (k + 2), 2) + np.tile([k, k + 1], n_pos)]),
            kind="stable",
        )  # fmt: skip
        extra_kind = np.array(["dictionary bias", "error"] * n_pos, dtype=object)
        extra_meta = part_meta(
            extra_kind,
            layer,
            -1,
            np.repeat(pos_np, 2),
            -1,
            np.nan,
            np.array([f"{d.name} bias", f"{d.name} error"] * n_pos, dtype=object),
        )
        meta = take_meta(concat_meta([f_meta, extra_meta]), order)
        row_ids = torch.cat([dec.feature_ids, torch.full((n_pos, 2), -1)], dim=1)
        coeffs = torch.cat([dec.coeffs, torch.zeros(n_pos, 2, dtype=dec.coeffs.dtype)], dim=1)
        return PartsBatch(positions, vectors, valid, meta, d.space, W_dec, row_ids, coeffs)

    def prepare(self, model: Any, cap: Capture, layer: int, positions: Int[Tensor, "n"]) -> None:
        """Decompose ``positions`` in one call of the SAE (its encoder is read once for all)."""
        dt = arch_of(model).dtype
        store = self._store(cap, layer, dt)
        missing = [p for p in positions.tolist() if p not in store]
        if missing:
            x = cap.get(self.dictionary.capture_hook).to(dt)[missing]
            self._decompose_into(store, x, missing)

    def _store(self, cap: Capture, layer: int, dtype: torch.dtype) -> dict[int, Decomposition]:
        return cap.derived.setdefault(("decomp", id(self.dictionary), layer, dtype), {})

    def _decompose_into(
        self, store: dict[int, Decomposition], x: Tensor, positions: list[int]
    ) -> None:
        dec = self.dictionary.decompose(x)
        for j, p in enumerate(positions):
            n_active = int((dec.feature_ids[j] >= 0).sum())
            store[p] = Decomposition(
                dec.feature_ids[j, :n_active],
                dec.coeffs[j, :n_active],
                dec.activations[j, :n_active],
                dec.bias[j],
                dec.error[j],
            )

    def decompose(self, cap: Capture, layer: int, x: Tensor, positions: Tensor) -> Decomposition:
        """Decompose only positions not yet decomposed on this capture; reuse the rest."""
        store = self._store(cap, layer, x.dtype)
        pos_list = positions.tolist()
        missing = [i for i, p in enumerate(pos_list) if p not in store]
        if missing:
            self._decompose_into(store, x[missing], [pos_list[i] for i in missing])
        items = [store[p] for p in pos_list]
        k = max(1, max(len(it.feature_ids) for it in items))

        def pad(ts: list[Tensor], fill: float) -> Tensor:  # [n_pos, k], right-padded with fill
            out = pad_sequence(ts, batch_first=True, padding_value=fill)
            return torch.nn.functional.pad(out, (0, k - out.shape[1]), value=fill)

        return Decomposition(
            pad([it.feature_ids for it in items], -1),
            pad([it.coeffs for it in items], 0.0),
            pad([it.activations for it in items], 0.0),
            torch.stack([it.bias for it in items]),
            torch.stack([it.error for it in items]),
        )


class UpstreamBasis:
    """Token embedding, positional embedding, each earlier head, attention bias and MLP output."""

    key = ("upstream",)

    def parts(
        self, model: Any, cap: Capture, layer: int, positions: Int[Tensor, "n"]
    ) -> PartsBatch:
        arch = arch_of(model)
        dt = arch.dtype
        vecs: list[Tensor] = []  # each [n_pos, n, d_model]
        kinds: list[str] = []
        layers: list[int] = []
        heads: list[int] = []
        labels: list[str] = []

        def add(v: Tensor, kind: str, lyr: int, head: int, label: str) -> None:
            vecs.append(v.to(dt)[:, None] if v.ndim == 2 else v.to(dt))
            kinds.append(kind)
            layers.append(lyr)
            heads.append(head)
            labels.append(label)

        embed_hook, pos_hook = arch.embed_hooks
        add(cap.get(embed_hook)[positions], "token embedding", -1, -1, "token embedding")
        if arch.has_pos_embed_part:
            add(
                cap.get(pos_hook)[positions],
                "positional embedding",
                -1,
                -1,
                "positional embedding",
            )
        for lyr in range(layer):
            la = arch.layer(lyr)
            z = cap.layer_act(lyr, la.hooks.z).to(dt)[positions]  # [n, head, d_head]
            head_out = torch.einsum("n h e, h e d -> n h d", z, la.W_O)
            b_O = la.b_O[None].expand(len(positions), -1)
            post = la.attn_out
            if post is not None:
                # Attention output is normalized before the residual add; at the frozen scale the
                # norm is linear, so each head's share is its output through that linear map.
                scale = cap.layer_act(lyr, post.scale_hook).to(dt).reshape(cap.n_tokens, -1)[:, 0]
                s = scale[positions]
                n, H, d = head_out.shape
                head_out = post.linear(head_out.reshape(n * H, d), s.repeat_interleave(H))
                head_out = head_out.reshape(n, H, d)
                b_O = post.forward(b_O, s)
            for h in range(la.n_heads):
                vecs.append(head_out[:, h : h + 1])
                kinds.append("head")
                layers.append(lyr)
                heads.append(h)
                labels.append(f"L{lyr}H{h}")
            add(b_O, "attention bias out", lyr, -1, f"L{lyr} attn b_O")
            if la.hooks.mlp_out is not None:
                add(cap.layer_act(lyr, la.hooks.mlp_out)[positions], "mlp", lyr, -1, f"L{lyr} MLP")
        vectors = torch.cat(vecs, dim=1)
        n_pos, n_slots = vectors.shape[:2]
        valid = torch.ones(n_pos, n_slots, dtype=torch.bool)
        pos_np = np.repeat(positions.numpy(), n_slots)
        meta = part_meta(
            np.tile(np.array(kinds, dtype=object), n_pos),
            np.tile(np.array(layers), n_pos),
            np.tile(np.array(heads), n_pos),
            pos_np,
            -1,
            np.nan,
            np.tile(np.array(labels, dtype=object), n_pos),
        )
        return PartsBatch(positions, vectors, valid, meta, "resid")
