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
from qk_lens.transcoders import Transcoders

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
                for v, kind, label in self.mlp_parts(model, cap, lyr, positions):
                    add(v, kind, lyr, -1, label)
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

    def mlp_parts(
        self, model: Any, cap: Capture, layer: int, positions: Int[Tensor, "n"]
    ) -> list[tuple[Float[Tensor, "n d_model"], str, str]]:
        """Layer ``layer``'s MLP output at ``positions`` as (vector, kind, label) parts: one."""
        la = arch_of(model).layer(layer)
        return [(cap.layer_act(layer, la.hooks.mlp_out)[positions], "mlp", f"L{layer} MLP")]


class TranscoderBasis(UpstreamBasis):
    """The upstream split with every MLP written as its transcoder features, bias, skip and
    error: token and positional embeddings, each earlier head and attention bias, and, per
    earlier layer, the active features' decoder writes (a CLT feature's writes summed over the
    layers before this one, listed at its source layer), the transcoder bias, the skip and the
    error (docs/transcoders.md)."""

    def __init__(self, transcoders: Transcoders) -> None:
        self.transcoders = transcoders

    @property
    def key(self) -> tuple:  # type: ignore[override]
        return ("transcoders", id(self.transcoders))

    def mlp_parts(
        self, model: Any, cap: Capture, layer: int, positions: Int[Tensor, "n"]
    ) -> list[tuple[Float[Tensor, "n d_model"], str, str]]:
        split = self.transcoders.split(model, cap)
        dt = split.dtype
        out = [(split.bias[layer][positions], "transcoder bias", f"L{layer} transcoder bias")]
        if split.skip is not None:
            out.append((split.skip[layer][positions], "transcoder skip", f"L{layer} skip"))
        out.append((split.error[layer][positions], "error", f"L{layer} transcoder error"))
        return [(v.to(dt), kind, label) for v, kind, label in out]

    def parts(
        self, model: Any, cap: Capture, layer: int, positions: Int[Tensor, "n"]
    ) -> PartsBatch:
        fixed = super().parts(model, cap, layer, positions)
        split = self.transcoders.split(model, cap)
        tc = self.transcoders
        # Active features at these positions, read before this layer (CLT: at any earlier layer).
        wanted = torch.isin(split.feat_pos, positions) & (split.feat_layer < layer)
        sel = torch.nonzero(wanted)[:, 0]
        vecs = split.feature_write_until(sel, layer).to(fixed.vectors.dtype)
        n_pos, n_fixed = fixed.vectors.shape[:2]
        slot_of = {int(p): i for i, p in enumerate(positions.tolist())}
        row = torch.tensor(
            [slot_of[int(p)] for p in split.feat_pos[sel].tolist()], dtype=torch.long
        )
        counts = (
            torch.bincount(row, minlength=n_pos)
            if len(sel)
            else torch.zeros(n_pos, dtype=torch.long)
        )
        k = int(counts.max()) if len(sel) else 0
        order = torch.argsort(row, stable=True)
        rank = torch.arange(len(sel)) - (torch.cumsum(counts, 0) - counts)[row[order]]
        feat = fixed.vectors.new_zeros(n_pos, k, fixed.vectors.shape[2])
        fvalid = torch.zeros(n_pos, k, dtype=torch.bool)
        feat[row[order], rank] = vecs[order]
        fvalid[row[order], rank] = True
        vectors = torch.cat([fixed.vectors, feat], dim=1)
        valid = torch.cat([fixed.valid, fvalid], dim=1)
        s = sel[order]
        layers_np = split.feat_layer[s].numpy()
        ids_np = split.feat_id[s].numpy()
        f_meta = part_meta(
            "feature",
            layers_np,
            -1,
            split.feat_pos[s].numpy(),
            ids_np,
            split.feat_act[s].to(torch.float64).numpy(),
            np.array(tc.labels_of(layers_np, ids_np), dtype=object),
        )
        # Row-major over (pos, slot): each position's fixed parts, then its features.
        width = n_fixed + k
        keys = np.concatenate([
            np.repeat(np.arange(n_pos), n_fixed) * width + np.tile(np.arange(n_fixed), n_pos),
            row[order].numpy() * width + n_fixed + rank.numpy(),
        ])  # fmt: skip
        meta = take_meta(concat_meta([fixed.meta, f_meta]), np.argsort(keys, kind="stable"))
        return PartsBatch(positions, vectors, valid, meta, "resid")
