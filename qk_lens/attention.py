"""Per-layer frozen affine maps from the residual stream into a head's query and key spaces.

This is where the architecture lives (DESIGN.md §2). With every norm scale frozen at its captured
value, the map part ↦ (query or key vector of that part) is linear, so the parts of any split of
the residual map to parts of the query/key that sum to the model's own query/key. The steps, in
TransformerLens's order: ln1 (frozen σ) → W_Q/W_K (+ the bias, once per position) → qk-norm (frozen)
→ rotary at the part's own position → 1/attn_scale (query side). Non-bilinear extras (softcap,
ALiBi, clip_qkv) are reported or refused, never hidden.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import einops
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor
from transformer_lens.components import LayerNorm, LayerNormPre, RMSNorm, RMSNormPre
from transformer_lens.utilities.activation_functions import softcap_enabled
from transformer_lens.utilities.architectures import POST_NORM_ARCHITECTURES

from qk_lens.capture import Capture

Side = Literal["query", "key"]
OLMO_QK_NORM = ("OlmoeForCausalLM", "Olmo2ForCausalLM", "Olmo3ForCausalLM")


def compute_dtype(model: Any) -> torch.dtype:
    """Explanations run in float64 for float64 models and float32 otherwise (bf16/fp16 included)."""
    return torch.float64 if model.cfg.dtype == torch.float64 else torch.float32


def norm_kind(module: Any) -> str:
    """Classify a TransformerLens norm module; linearization depends only on this."""
    if isinstance(module, LayerNorm):
        return "LN"
    if isinstance(module, LayerNormPre):
        return "LNPre"
    if isinstance(module, RMSNorm):
        return "RMS"
    if isinstance(module, RMSNormPre):
        return "RMSPre"
    if isinstance(module, torch.nn.Identity) or module is None:
        return "none"
    raise ValueError(f"unsupported norm module {type(module).__name__}")


def linearize_norm(
    vectors: Float[Tensor, "n d"],
    scale: Float[Tensor, "n"] | None,
    kind: str,
    weight: Float[Tensor, "d"] | None,
    centered_already: bool = False,
) -> Float[Tensor, "n d"]:
    """The norm at a frozen per-part scale, without its bias: exact for any split of the input."""
    if kind == "none":
        return vectors
    out = vectors
    if kind in ("LN", "LNPre") and not centered_already:
        out = out - out.mean(-1, keepdim=True)
    if scale is not None:
        out = out / scale[:, None]
    if kind in ("LN", "RMS") and weight is not None:
        out = out * weight
    return out


class LayerQK:
    """The frozen query/key maps of one attention layer for one capture."""

    def __init__(self, model: Any, layer: int, cap: Capture) -> None:
        cfg = model.cfg
        if cfg.positional_embedding_type == "relative_positional_bias":
            raise ValueError("relative positional bias (T5) is not supported by qk_lens")
        self.model = model
        self.cap = cap
        self.layer = layer
        self.dtype = compute_dtype(model)
        block = model.blocks[layer]
        attn = block.attn
        self.attn = attn
        self.n_heads = cfg.n_heads
        self.n_kv = cfg.n_key_value_heads or cfg.n_heads
        if getattr(cfg, "ungroup_grouped_query_attention", False):
            self.n_kv = cfg.n_heads
        self.rep = self.n_heads // self.n_kv
        self.d_head = cfg.d_head
        dt = self.dtype

        # ln1 feeds attention, except in post-norm architectures (OLMo-2/3) where attention reads
        # the raw residual and ln1 normalizes its output instead.
        self.post_norm_arch = cfg.original_architecture in POST_NORM_ARCHITECTURES
        ln1 = None if self.post_norm_arch else block.ln1
        self.norm_kind = norm_kind(ln1)
        self.norm_w = ln1.w.detach().to(dt) if hasattr(ln1, "w") else None
        self.norm_b = ln1.b.detach().to(dt) if hasattr(ln1, "b") else None

        self.W_Q: Float[Tensor, "head d_model d_head"] = attn.W_Q.detach().to(dt)
        self.b_Q: Float[Tensor, "head d_head"] = attn.b_Q.detach().to(dt)
        # Under GQA TransformerLens stores one key map per kv head (_W_K) and repeats it in W_K.
        w_k = attn._W_K if hasattr(attn, "_W_K") else attn.W_K
        b_k = attn._b_K if hasattr(attn, "_b_K") else attn.b_K
        self.W_K: Float[Tensor, "kv_head d_model d_head"] = w_k.detach().to(dt)
        self.b_K: Float[Tensor, "kv_head d_head"] = b_k.detach().to(dt)
        if self.W_K.shape[0] != self.n_kv:
            self.n_kv = self.W_K.shape[0]
            self.rep = self.n_heads // self.n_kv

        self.qk_norm = None
        if cfg.use_qk_norm:
            self.qk_norm = "per_head"
        elif cfg.original_architecture in OLMO_QK_NORM and attn.q_norm is not None:
            self.qk_norm = "full"
        self.rotary = cfg.positional_embedding_type == "rotary"
        self.rotary_dim = cfg.rotary_dim
        self.attn_scale = float(attn.attn_scale)
        self.softcap = (
            cfg.attn_scores_soft_cap if softcap_enabled(cfg.attn_scores_soft_cap) else None
        )
        self.alibi = cfg.positional_embedding_type == "alibi"
        self.shortformer = cfg.positional_embedding_type == "shortformer"
        if self.alibi and self.softcap is not None:
            raise ValueError("ALiBi together with attention softcap is not supported")
        self.causal = (attn._attention_dir_override or cfg.attention_dir) == "causal"
        self.window = cfg.window_size if attn.attn_type == "local" else None
        self.clip = cfg.clip_qkv
        self.logn = bool(cfg.use_logn_attn) and not model.training

    # ----------------------------------------------------------------- masks and positions
    def key_allowed(
        self, q_pos: Int[Tensor, "nq"], k_pos: Int[Tensor, "nk"]
    ) -> Bool[Tensor, "nq nk"]:
        """Which (query, key) pairs the model's mask lets through."""
        ok = torch.ones(len(q_pos), len(k_pos), dtype=torch.bool)
        if self.causal:
            ok &= k_pos[None, :] <= q_pos[:, None]
            if self.window is not None:
                ok &= k_pos[None, :] > q_pos[:, None] - self.window
        return ok

    def describe_mask(self, q: int) -> str:
        if not self.causal:
            return f"any key in [0, {self.cap.n_tokens})"
        lo = 0 if self.window is None else max(0, q - self.window + 1)
        extra = "" if self.window is None else f" (local attention, window {self.window})"
        return f"keys in [{lo}, {q}]{extra}"

    # ----------------------------------------------------------------- the linear maps
    def _frozen_ln_scale(self, positions: Int[Tensor, "n"]) -> Float[Tensor, "n"] | None:
        if self.norm_kind == "none":
            return None
        scale = self.cap.layer_act(self.layer, "ln1.hook_scale")
        scale = scale.reshape(scale.shape[0], -1)[:, 0]  # [pos] (split-qkv adds a head axis)
        return scale.to(self.dtype)[positions]

    def head_weights(
        self, side: Side, heads: Int[Tensor, "h"]
    ) -> tuple[Float[Tensor, "h d_model d_head"], Float[Tensor, "h d_head"]]:
        if side == "query":
            return self.W_Q[heads], self.b_Q[heads]
        kv = heads // self.rep
        return self.W_K[kv], self.b_K[kv]

    def project(
        self,
        side: Side,
        vectors: Float[Tensor, "n d_model"],
        positions: Int[Tensor, "n"],
        heads: Int[Tensor, "h"],
        space: str = "resid",
    ) -> Float[Tensor, "h n d_head"]:
        """Residual-space parts (each at its own position) → their parts of the head's q or k."""
        return self._finish(
            side, self.pre_rotary(side, vectors, positions, heads, space), positions, heads
        )

    def frozen_scale(self, positions: Int[Tensor, "n"], space: str) -> Float[Tensor, "n"] | None:
        """What ln1 divides a part at each position by (None: nothing), for parts in ``space``."""
        return self._frozen_ln_scale(positions) if space == "resid" else None

    def pre_rotary_rows(
        self,
        side: Side,
        rows: Float[Tensor, "n d_model"],
        heads: Int[Tensor, "h"],
        space: str,
    ) -> Float[Tensor, "h n d_head"]:
        """:meth:`pre_rotary` of position-free rows, before the per-position 1/σ: a part at
        position p that is c · row has pre-rotary value c / frozen_scale(p) times this."""
        if space not in ("resid", "normalized"):
            raise ValueError(f"rows in space {space!r} have no position-free projection")
        x = linearize_norm(
            rows.to(self.dtype), None, self.norm_kind, self.norm_w,
            centered_already=space == "normalized",
        )  # fmt: skip
        W, _ = self.head_weights(side, heads)
        return einops.einsum(x, W, "n d_model, h d_model d_head -> h n d_head")

    def pre_rotary(
        self,
        side: Side,
        vectors: Float[Tensor, "n d_model"],
        positions: Int[Tensor, "n"],
        heads: Int[Tensor, "h"],
        space: str = "resid",
    ) -> Float[Tensor, "h n d_head"]:
        """The parts' share of ``hook_q`` / ``hook_k``: ln1 at its frozen scale, then W_Q / W_K
        (no bias; qk-norm, rotary and scaling come after, in :meth:`project`)."""
        x = vectors.to(self.dtype)
        if space == "normalized":
            # A dictionary on ln1.hook_normalized already sits after centring and 1/σ.
            x = linearize_norm(x, None, self.norm_kind, self.norm_w, centered_already=True)
        elif space == "attn_input":
            pass  # added after the norm (shortformer positions)
        else:
            x = linearize_norm(x, self._frozen_ln_scale(positions), self.norm_kind, self.norm_w)
        W, _ = self.head_weights(side, heads)
        return einops.einsum(x, W, "n d_model, h d_model d_head -> h n d_head")

    def project_bias(
        self, side: Side, positions: Int[Tensor, "n"], heads: Int[Tensor, "h"]
    ) -> Float[Tensor, "h n d_head"]:
        """The attention-bias part at each position: ln1.b · W + b_Q/b_K, then the same frozen steps."""
        W, b = self.head_weights(side, heads)
        pre = b[:, None, :].expand(-1, len(positions), -1)
        if self.norm_b is not None:
            pre = (
                pre
                + einops.einsum(self.norm_b, W, "d_model, h d_model d_head -> h d_head")[:, None]
            )
        return self._finish(side, pre.clone(), positions, heads)

    def _qk_norm_scale(
        self, side: Side, positions: Int[Tensor, "n"], heads: Int[Tensor, "h"]
    ) -> Float[Tensor, "h n 1"]:
        name = "attn.q_norm.hook_scale" if side == "query" else "attn.k_norm.hook_scale"
        scale = self.cap.layer_act(self.layer, name).to(self.dtype)
        T = self.cap.n_tokens
        if self.qk_norm == "full":
            per_pos = scale.reshape(T)  # one scale per position over all heads
            return per_pos[positions][None, :, None].expand(len(heads), -1, -1)
        n = self.n_heads if side == "query" else self.n_kv
        idx = heads if side == "query" else heads // self.rep
        per = scale.reshape(T, n)  # TL flattens [batch*pos*head, 1]
        return per[positions][:, idx].T[:, :, None]

    def _qk_norm_weight(self, side: Side, heads: Int[Tensor, "h"]) -> Float[Tensor, "h d_head"]:
        norm = self.attn.q_norm if side == "query" else self.attn.k_norm
        w = norm.w.detach().to(self.dtype)
        if self.qk_norm == "full":
            idx = heads if side == "query" else heads // self.rep
            return w.reshape(-1, self.d_head)[idx]
        return w[None, :].expand(len(heads), -1)

    def _finish(
        self,
        side: Side,
        pre: Float[Tensor, "h n d_head"],
        positions: Int[Tensor, "n"],
        heads: Int[Tensor, "h"],
    ) -> Float[Tensor, "h n d_head"]:
        out = pre
        if self.qk_norm is not None:
            out = (
                out
                / self._qk_norm_scale(side, positions, heads)
                * self._qk_norm_weight(side, heads)[:, None]
            )
        if self.rotary:
            out = self._rotate(out, positions)
        if side == "query":
            if self.logn:
                out = out * self._logn_factor(positions)[None, :, None]
            out = out / self.attn_scale
        return out

    def _rotate(
        self, x: Float[Tensor, "h n d_head"], positions: Int[Tensor, "n"]
    ) -> Float[Tensor, "h n d_head"]:
        # The model's own buffers, read after the forward (they may have grown during it).
        cos = self.attn.rotary_cos.to(self.dtype)[positions][None]
        sin = self.attn.rotary_sin.to(self.dtype)[positions][None]
        r = self.rotary_dim
        x_rot, x_pass = x[..., :r], x[..., r:]
        rotated = x_rot * cos + self.attn.rotate_every_two(x_rot) * sin
        return torch.cat([rotated, x_pass], dim=-1)

    def _logn_factor(self, positions: Int[Tensor, "n"]) -> Float[Tensor, "n"]:
        cfg = self.model.cfg
        train = cfg.train_seq_length or cfg.n_ctx
        if self.cap.n_tokens <= train:
            return torch.ones(len(positions), dtype=self.dtype)
        p = (positions + 1).to(self.dtype)
        return torch.where(p > train, p.log() / math.log(train), torch.ones_like(p))

    # ----------------------------------------------------------------- extras
    def alibi_terms(
        self, heads: Int[Tensor, "h"], q_pos: Int[Tensor, "nq"], k_pos: Int[Tensor, "nk"]
    ) -> Float[Tensor, "h nq nk"]:
        """The ALiBi bias the model added, sliced exactly as TransformerLens slices its buffer."""
        if not self.alibi:
            return torch.zeros(len(heads), len(q_pos), len(k_pos), dtype=self.dtype)
        T = self.cap.n_tokens
        table = self.attn.alibi.to(self.dtype)[:, -T:, :T]
        return table[heads][:, q_pos][:, :, k_pos]

    def check_clip(self, side: Side, positions: Int[Tensor, "n"], heads: Int[Tensor, "h"]) -> None:
        """clip_qkv is not linear: refuse when it clipped a query/key this explanation uses."""
        if self.clip is None:
            return
        name = "attn.hook_q" if side == "query" else "attn.hook_k"
        raw = self.cap.layer_act(self.layer, name).to(self.dtype)  # [pos, head, d_head]
        idx = heads if side == "query" else heads // self.rep
        vals = raw[positions][:, idx]
        if self.qk_norm is not None:
            scale = self._qk_norm_scale(side, positions, heads).permute(1, 0, 2)
            vals = vals / scale * self._qk_norm_weight(side, heads)[None]
        if (vals.abs() > self.clip).any():
            where = positions.tolist() if len(positions) <= 8 else f"{len(positions)} positions"
            raise ValueError(
                f"clip_qkv={self.clip} clipped the {side} of layer {self.layer} head(s) "
                f"{heads.tolist()} at position(s) {where}; clipping is not linear, so the score "
                "cannot be split exactly there"
            )

    def model_raw_scores(self) -> Float[Tensor, "head q k"]:
        """The model's own pre-softcap score (q·k/scale + ALiBi), read from its hooks."""
        key = ("raw_scores", self.layer)
        if key in self.cap.derived:
            return self.cap.derived[key]
        final = self.cap.scores(self.layer).to(self.dtype)
        if self.softcap is None:
            raw = final
        elif self.rotary and self.cap.has(f"blocks.{self.layer}.attn.hook_rot_q"):
            q = self.cap.layer_act(self.layer, "attn.hook_rot_q").to(self.dtype)
            k = self.cap.layer_act(self.layer, "attn.hook_rot_k").to(self.dtype)
            if self.logn:
                q = q * self._logn_factor(torch.arange(self.cap.n_tokens))[:, None, None]
            k = torch.repeat_interleave(k, self.n_heads // k.shape[1], dim=1)
            raw = einops.einsum(q, k, "q h d, k h d -> h q k") / self.attn_scale
        else:
            cap = self.softcap
            raw = cap * torch.atanh((final / cap).clamp(-1 + 1e-15, 1 - 1e-15))
        self.cap.derived[key] = raw
        return raw
