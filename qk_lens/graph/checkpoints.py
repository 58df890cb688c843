"""The checkpoints of an attribution graph: node sets, target readouts and the frozen blocks
between them, all read from the prompt's one capture (docs/graphs.md)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import einops
import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from qk_lens.arch import BlockMaps, FrozenNorm, arch_of
from qk_lens.bases import DictionaryBasis
from qk_lens.capture import prompt_to_tokens
from qk_lens.checks import as_int, check_count, check_fraction
from qk_lens.dictionaries import Decomposition, encoder_readout
from qk_lens.graph.nodes import (
    READOUTS,
    NodeSet,
    Targets,
    bias_id,
    embedding_id,
    error_id,
    feature_id,
)
from qk_lens.state import block_maps, capture_device, capture_tokens, require_attached, state_of


class Checkpoints:
    """Everything one graph (or its head loadings) reads: nodes, readouts and frozen blocks.

    Built from the model's cached capture of the prompt; no extra forward pass.
    """

    def __init__(self, model: Any, prompt: Any, readout: str = "encoder") -> None:
        check_model(model)
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        self.model = model
        self.arch = arch_of(model)
        self.readout = readout
        self.n_layers = self.arch.n_layers
        self.dicts = check_dictionaries(model)
        self.tokens = prompt_to_tokens(model, prompt)
        self.cap = capture_tokens(model, self.tokens)
        self.T = self.cap.n_tokens
        self.dtype = self.arch.dtype
        self.device = capture_device(self.cap)
        self.str_tokens = self.cap.str_tokens or [str(t) for t in self.tokens.tolist()]
        self._nodes: dict[int, NodeSet] = {}
        self._decomp: dict[int, Any] = {}

    # ------------------------------------------------------------------ layout
    @property
    def has_layer0(self) -> bool:
        return 0 in self.dicts

    @property
    def source_layers(self) -> list[int]:
        """-1 (embeddings) then every dictionary layer, ascending."""
        return [-1, *sorted(self.dicts)]

    @property
    def target_layers(self) -> list[int]:
        """Layers whose nodes have incoming edges: the dictionary layers fed by a block or the
        embeddings, and ``n_layers`` (logits)."""
        first = 0 if self.has_layer0 else 1
        return list(range(first, self.n_layers + 1))

    def source_of(self, target_layer: int) -> int:
        """The node layer feeding ``target_layer`` (-1: the embeddings)."""
        if target_layer == 0 or (target_layer == 1 and not self.has_layer0):
            return -1
        return target_layer - 1

    @staticmethod
    def crossed(target_layer: int) -> int:
        """The attention layer an edge into ``target_layer`` crosses (-1: none)."""
        return target_layer - 1

    # ------------------------------------------------------------------ residuals
    def resid(self, layer: int) -> Float[Tensor, "pos d_model"]:
        """x_K: the residual entering block K; x_n is the last block's output."""
        if layer < self.n_layers:
            return self.cap.layer_act(layer, "hook_resid_pre").to(self.dtype)
        last = self.n_layers - 1
        # Same additions, in the same order and dtype, as the block's forward.
        hooks = self.arch.layer(last).hooks
        x = self.cap.layer_act(last, hooks.resid_pre) + self.cap.layer_act(last, hooks.attn_out)
        if hooks.mlp_out is not None:
            x = x + self.cap.layer_act(last, hooks.mlp_out)
        return x.to(self.dtype)

    # ------------------------------------------------------------------ nodes
    def nodes(self, layer: int) -> NodeSet:
        if layer not in self._nodes:
            self._nodes[layer] = self._embedding_nodes() if layer == -1 else self._dict_nodes(layer)
        return self._nodes[layer]

    def _embedding_nodes(self) -> NodeSet:
        toks = self.tokens.tolist()
        T = self.T
        return NodeSet(
            layer=-1,
            ids=[embedding_id(t, p) for p, t in enumerate(toks)],
            kind=np.full(T, "embedding", dtype=object),
            positions=torch.arange(T),
            feature=np.asarray(toks, dtype=np.int64),
            activation=np.full(T, np.nan),
            coefficient=np.full(T, np.nan),
            label=list(self.str_tokens),
            vectors=self.resid(0).to(self.device),
            n_features=0,
        )

    def decomposition(self, layer: int) -> Decomposition:
        if layer not in self._decomp:
            basis = DictionaryBasis(self.dicts[layer])
            x = self.resid(layer)
            # The basis's cache is shared with qk_attribution on this capture: same numbers.
            self._decomp[layer] = basis.decompose(self.cap, layer, x, torch.arange(self.T))
        return self._decomp[layer]

    def _dict_nodes(self, layer: int) -> NodeSet:
        d = self.dicts[layer]
        dec = self.decomposition(layer)
        T = self.T
        active = dec.feature_ids >= 0
        pos_f, slot_f = torch.nonzero(active, as_tuple=True)  # position-major order
        fids = dec.feature_ids[pos_f, slot_f]
        coeffs = dec.coeffs[pos_f, slot_f].to(self.device)
        W_dec = d.decoder(self.dtype, self.device)
        feat_vecs = coeffs[:, None] * W_dec[fids.to(self.device)]
        vectors = torch.cat([feat_vecs, dec.error.to(self.device), dec.bias.to(self.device)])
        pos_f, fids = pos_f.cpu(), fids.cpu()  # metadata lives on the CPU
        n_f = len(fids)
        fid_np = fids.numpy()
        pos_np = pos_f.numpy()
        ids = [
            feature_id(layer, f, p) for f, p in zip(fid_np.tolist(), pos_np.tolist(), strict=True)
        ]
        ids += [error_id(layer, p) for p in range(T)] + [bias_id(layer, p) for p in range(T)]
        kind = np.array(["feature"] * n_f + ["error"] * T + ["bias"] * T, dtype=object)
        labels = [d.label(int(f)) for f in fid_np]
        labels += [f"{d.name} error"] * T + [f"{d.name} bias"] * T
        nan = np.full(2 * T, np.nan)
        return NodeSet(
            layer=layer,
            ids=ids,
            kind=kind,
            positions=torch.cat([pos_f, torch.arange(T), torch.arange(T)]),
            feature=np.concatenate([fid_np, np.full(2 * T, -1)]).astype(np.int64),
            activation=np.concatenate(
                [dec.activations.cpu()[pos_f, slot_f.cpu()].double().numpy(), nan]
            ),
            coefficient=np.concatenate(
                [dec.coeffs.cpu()[pos_f, slot_f.cpu()].double().numpy(), nan]
            ),
            label=labels,
            vectors=vectors,
            n_features=n_f,
        )

    # ------------------------------------------------------------------ readouts
    def feature_targets(self, layer: int) -> Targets:
        """The readouts of layer ``layer``'s active features."""
        ns = self.nodes(layer)
        n = ns.n_features
        pos = ns.positions[:n].to(self.device)
        fids = torch.as_tensor(ns.feature[:n])
        x = self.resid(layer).to(self.device)[pos]
        d = self.dicts[layer]
        if self.readout == "decoder":
            W = ns.vectors[:n].clone()  # a_t · d_t, the paper's target vector
            const = torch.zeros(n, dtype=self.dtype, device=self.device)
        else:
            W, const = encoder_readout(d, fids, x, self.dtype)
        value = (W * x).sum(-1) + const
        return Targets(W, const, pos, value)

    def block(self, layer: int) -> BlockMaps:
        return block_maps(self.model, self.cap, layer)

    # ------------------------------------------------------------------ logits
    @property
    def logits(self) -> LogitReadouts:
        return LogitReadouts(self.arch, self.resid(self.n_layers), self.dtype, self.device)

    def final_logits(self, pos: int) -> Float[Tensor, "vocab"]:
        return self.logits.final_logits(pos)

    def logit_targets(self, specs: list[tuple[int, int]], pos: int) -> Targets:
        return self.logits.logit_targets(specs, pos)

    # ------------------------------------------------------------------ edges
    def edge_block(
        self, target_layer: int, targets: Targets, batch_size: int = 256
    ) -> tuple[Float[Tensor, "n_target n_source"], Float[Tensor, "n_target"]]:
        """All edges into ``target_layer``'s targets from the layer below (dense), and each
        target's offset: its readout constant plus the attention biases read through the same
        frozen map, so that for attention-only models readout = Σ edges + offset exactly."""
        src = self.nodes(self.source_of(target_layer))
        L = self.crossed(target_layer)
        n_t, n_s = len(targets.positions), len(src)
        if L < 0:  # embeddings → layer-0 features: the readout itself, same position only
            E = torch.zeros(n_t, n_s, dtype=self.dtype, device=self.device)
            pos = targets.positions
            E[torch.arange(n_t), pos] = (targets.readout * src.vectors[pos]).sum(-1)
            return E, targets.const.clone()
        bm = self.block(L)
        V_pad, flat = pad_by_position(src.vectors, src.positions.to(self.device), self.T)
        out = torch.empty(n_t, n_s, dtype=self.dtype, device=self.device)
        offset = torch.empty(n_t, dtype=self.dtype, device=self.device)
        for lo in range(0, n_t, batch_size):
            sl = slice(lo, min(n_t, lo + batch_size))
            w, pos = targets.readout[sl], targets.positions[sl]
            u_mlp, u_head = bm.cotangents(w, pos)
            z = bm.head_z(u_head, pos)  # [n, head, d_model]
            # Keys after the chunk's last target have zero attention (causal): skip them.
            K = int(pos.max()) + 1 if bm.causal else self.T
            alpha = bm.alpha(pos)[:, :, :K]
            # G_t[k] = Σ_h A_h[p_t, k] / σ_k · z_{t,h}: the readout's gradient at key position k
            G = einops.einsum(alpha, z, "n head k, n head d_model -> k n d_model")
            G[pos, torch.arange(len(pos), device=self.device)] += w + u_mlp  # residual + MLP
            E_pad = torch.bmm(G, V_pad[:K].transpose(1, 2))  # [k, n, slot]
            E_pad = E_pad.permute(1, 0, 2).reshape(len(pos), -1)
            row = torch.zeros(
                len(pos), V_pad.shape[0] * V_pad.shape[1], dtype=self.dtype, device=self.device
            )
            row[:, : E_pad.shape[1]] = E_pad
            out[sl] = row[:, flat]
            offset[sl] = targets.const[sl] + (u_head * bm.bias_out(pos)).sum(-1)
        return out, offset


class LogitReadouts:
    """Logit targets read off the final residual ``x_n`` (ln_final frozen at its scale there)."""

    def __init__(
        self, arch: Any, x_final: Float[Tensor, "pos d_model"], dtype: torch.dtype, device: Any
    ) -> None:
        self.arch = arch
        self.x = x_final.to(device)
        self.dtype = dtype
        self.device = device

    def final_logits(self, pos: int) -> Float[Tensor, "vocab"]:
        """The raw (pre-softcap) logits at ``pos``, from the capture: no second forward."""
        x = self.x[pos]
        norm = self._final_norm()
        h = norm.forward(x[None], norm.scale(x[None]))[0]
        W_U, b_U = self._unembed()
        return h @ W_U + b_U

    def _final_norm(self) -> FrozenNorm:
        return self.arch.final_norm.to(self.dtype, self.device)

    def _unembed(self) -> tuple[Float[Tensor, "d_model vocab"], Float[Tensor, "vocab"]]:
        return self.arch.W_U.to(self.device, self.dtype), self.arch.b_U.to(self.device, self.dtype)

    def logit_targets(self, specs: list[tuple[int, int]], pos: int) -> Targets:
        """Readouts of demeaned logits (or logit differences, ``b >= 0``) at ``pos``."""
        norm = self._final_norm()
        x = self.x[pos]
        scale = norm.scale(x[None])
        W_U, b_U = self._unembed()
        # Mean-centred columns (logit − mean logit), only for the targets' tokens.
        mean_col, mean_b = W_U.mean(1), b_U.mean()
        a = torch.tensor([s[0] for s in specs], device=self.device)
        b = torch.tensor([max(s[1], 0) for s in specs], device=self.device)
        is_diff = torch.tensor([s[1] >= 0 for s in specs], device=self.device)
        # A difference a − b cancels the means; a single logit subtracts them.
        cols = W_U[:, a].T - torch.where(is_diff[:, None], W_U[:, b].T, mean_col[None])
        consts = b_U[a] - torch.where(is_diff, b_U[b], mean_b)
        readout = norm.transpose(cols, scale.expand(len(specs)))
        if norm.bias is not None:
            consts = consts + cols @ norm.bias
        positions = torch.full((len(specs),), pos, dtype=torch.long, device=self.device)
        value = (readout * x).sum(-1) + consts
        return Targets(readout, consts, positions, value)


def pad_by_position(
    vectors: Float[Tensor, "n d"], positions: Int[Tensor, "n"], n_pos: int
) -> tuple[Float[Tensor, "pos slot d"], Int[Tensor, "n"]]:
    """Group rows by position into a padded [pos, slot, d] tensor; ``flat`` maps each row to its
    index in the flattened (pos, slot) axis."""
    counts = torch.bincount(positions, minlength=n_pos)
    S = max(int(counts.max()), 1) if len(positions) else 1
    order = torch.argsort(positions, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.empty_like(positions)
    rank[order] = torch.arange(len(positions), device=positions.device) - starts[positions[order]]
    flat = positions * S + rank
    V = vectors.new_zeros(n_pos * S, vectors.shape[1])
    V[flat] = vectors
    return V.reshape(n_pos, S, -1), flat


def check_model(model: Any) -> None:
    """TypeError unless qk_lens is attached; ValueError for blocks graphs cannot linearize."""
    require_attached(model)
    arch = arch_of(model)
    if arch.post_norm:
        raise ValueError(
            f"{arch.name} is a post-norm architecture (ln1/ln2 normalize the attention/MLP "
            "outputs); attribution graphs support pre-norm blocks only"
        )
    if arch.moe:
        raise ValueError("mixture-of-experts MLPs are not supported by attribution graphs")


def check_dictionaries(model: Any) -> dict[int, Any]:
    """The dictionaries by layer; every layer 1..n−1 needs one on the residual stream."""
    n = arch_of(model).n_layers
    dicts = dict(state_of(model).dictionaries)
    missing = [layer for layer in range(1, n) if layer not in dicts]
    if missing:
        have = sorted(dicts) or "none"
        raise ValueError(
            f"attribution graphs need a residual-stream dictionary at every layer 1..{n - 1} "
            f"(layer 0 is optional: without one, the embeddings are its basis); missing: "
            f"{missing} (layers with one: {have}). Checkpointing makes each edge cross exactly "
            "one attention layer, so that its head loadings are well defined: without a "
            "dictionary at layer L, edges would run through chains of heads in two layers. Add "
            "one with model.add_dictionary(sae) for an SAE on blocks.L.hook_resid_pre."
        )
    for layer, d in dicts.items():
        if d.space != "resid":
            raise ValueError(
                f"the dictionary for layer {layer} reads {d.hook_name!r} (after ln1), not the "
                "residual stream; graph edges need source vectors that sum to the residual: use "
                f"an SAE on blocks.{layer}.hook_resid_pre"
            )
    return dicts


# ============================================================================ targets
@dataclass
class LogitSpec:
    token: int
    token_b: int  # -1 unless a logit difference
    label: str
    prob: float
    weight: float


def resolve_targets(
    model: Any,
    ctx: Checkpoints,
    targets: Any,
    pos: int,
    max_n_logits: int,
    desired_logit_prob: float,
) -> list[LogitSpec]:
    """Target specs: the top predictions (circuit-tracer's rule) or the user's tokens/differences."""
    logits = ctx.final_logits(pos)
    shown = ctx.arch.capped_logits(logits)
    probs = torch.softmax(shown.double(), -1).cpu()
    V = probs.shape[0]

    def name(t: int) -> str:
        if model.tokenizer is not None:
            return model.tokenizer.decode([t])
        return str(t)

    def tok(v: Any) -> int:
        if isinstance(v, str):
            if model.tokenizer is None:
                raise ValueError(f"target {v!r} is a string but the model has no tokenizer")
            try:
                return int(model.to_single_token(v))
            except (AssertionError, ValueError, KeyError) as e:
                raise ValueError(f"target {v!r} is not a single token ({e})") from None
        t = as_int("target token", v)
        if not 0 <= t < V:
            raise ValueError(f"target token {t} is outside the vocabulary [0, {V})")
        return t

    if targets is None:
        max_n_logits = check_count("max_n_logits", max_n_logits)
        desired = check_fraction("desired_logit_prob", desired_logit_prob)
        top_p, top_i = probs.topk(min(max_n_logits, V))
        n = int((top_p.cumsum(0) < desired).sum()) + 1
        n = min(n, len(top_i))
        return [
            LogitSpec(int(i), -1, f'Output "{name(int(i))}"', float(p), float(p))
            for p, i in zip(top_p[:n].tolist(), top_i[:n].tolist(), strict=True)
        ]
    items = targets if isinstance(targets, list) else [targets]
    if not items:
        raise ValueError("targets is an empty list; give tokens, (a, b) pairs, or None")
    out = []
    for item in items:
        if isinstance(item, tuple):
            if len(item) != 2:
                raise ValueError(f"a logit-difference target is a pair (a, b), got {item!r}")
            a, b = tok(item[0]), tok(item[1])
            if a == b:
                raise ValueError(f"logit-difference target {item!r} compares a token with itself")
            label = f'"{name(a)}" − "{name(b)}"'
            out.append(LogitSpec(a, b, label, float(probs[a] - probs[b]), 1.0))
        else:
            a = tok(item)
            out.append(LogitSpec(a, -1, f'Output "{name(a)}"', float(probs[a]), float(probs[a])))
    return out
