"""HookedTransformer weights as a Hugging Face module, for a TransformerBridge to wrap.

TransformerLens 4 has no HookedTransformer, so a model saved as a HookedTransformer state dict
(the bundled toy models) is rebuilt as the Hugging Face family with the same computation:
LayerNorm + learned positions → ``GPT2LMHeadModel``; LayerNorm + rotary (rotate-half pairs, as
TransformerLens's default) → ``GPTNeoXForCausalLM`` (sequential residual, not Pythia's parallel
one); RMSNorm + rotary → ``LlamaForCausalLM`` with attention biases. HookedTransformer's
unembedding bias becomes a bias on ``lm_head``. Attention-only models get an MLP whose
output projection is zero, which adds exactly 0 to the residual stream; models with GELU
(``gelu_new``) MLPs keep theirs, in the GPT-2 and GPT-NeoX families (Llama's MLP is gated).
"""

from __future__ import annotations

from typing import Any

import einops
import torch
from torch import Tensor, nn

__all__ = ["CONVERTIBLE", "hooked_to_hf"]

# (normalization_type, positional_embedding_type) -> Hugging Face class
CONVERTIBLE = {
    ("LN", "standard"): "GPT2LMHeadModel",
    ("LN", "rotary"): "GPTNeoXForCausalLM",
    ("RMS", "rotary"): "LlamaForCausalLM",
}


# Config fields the rebuild reads (or that do not change the computation); any other field set
# in the config (a custom attention scale, softcaps, local attention, ...) is refused.
_UNDERSTOOD = (
    "n_layers", "d_model", "n_heads", "d_head", "n_ctx", "d_vocab", "d_vocab_out", "attn_only",
    "act_fn", "d_mlp", "normalization_type", "positional_embedding_type", "eps", "rotary_dim",
    "rotary_base", "rotary_adjacent_pairs", "n_key_value_heads", "use_attn_scale", "attn_scale",
    "seed", "model_name", "default_prepend_bos", "tokenizer_name", "init_weights", "init_mode",
    "initializer_range", "device", "dtype",
)  # fmt: skip


def _require(cfg: dict[str, Any], key: str, allowed: tuple[Any, ...], default: Any) -> Any:
    value = cfg.get(key, default)
    if value not in allowed:
        raise ValueError(
            f"cannot rebuild a HookedTransformer with {key}={value!r} as a Hugging Face model; "
            f"convertible: {key} in {allowed}"
        )
    return value


def hooked_to_hf(cfg: dict[str, Any], state: dict[str, Tensor]) -> tuple[nn.Module, Any, str]:
    """(Hugging Face model, its config, its class name) computing what the HookedTransformer
    with config dict ``cfg`` (HookedTransformerConfig's fields) and ``state`` computes."""
    import transformers

    kind = (cfg.get("normalization_type"), cfg.get("positional_embedding_type", "standard"))
    if kind not in CONVERTIBLE:
        raise ValueError(
            f"cannot rebuild a HookedTransformer with normalization_type={kind[0]!r} and "
            f"positional_embedding_type={kind[1]!r} as a Hugging Face model; convertible: "
            + ", ".join(f"{n}+{p} ({c})" for (n, p), c in CONVERTIBLE.items())
        )
    unknown = sorted(set(cfg) - set(_UNDERSTOOD))
    if unknown:
        raise ValueError(
            f"cannot rebuild this HookedTransformer as a Hugging Face model: its config sets "
            f"{unknown}, which the rebuild does not carry over; it understands "
            f"{sorted(_UNDERSTOOD)}"
        )
    n_layers, d_model, n_heads, d_head = (
        cfg[k] for k in ("n_layers", "d_model", "n_heads", "d_head")
    )
    attn_only = bool(cfg.get("attn_only", False))
    if not attn_only and kind[0] != "LN":
        raise ValueError(
            "cannot rebuild a HookedTransformer with MLPs and normalization_type="
            f"{kind[0]!r} as a Hugging Face model; MLPs convert with LayerNorm (GPT-2, "
            "GPT-NeoX) only"
        )
    if not attn_only:
        _require(cfg, "act_fn", ("gelu_new",), None)  # GPT-2's activation
    _require(cfg, "n_key_value_heads", (None,), None)
    _require(cfg, "use_attn_scale", (True,), True)
    _require(cfg, "attn_scale", (-1.0, d_head**0.5), -1.0)
    if n_heads * d_head != d_model:
        raise ValueError(f"n_heads * d_head = {n_heads * d_head} must equal d_model = {d_model}")
    eps = float(cfg.get("eps", 1e-5))
    shape = dict(vocab_size=cfg["d_vocab"], tie_word_embeddings=False)
    name = CONVERTIBLE[kind]
    if name == "GPT2LMHeadModel":
        hf_cfg = transformers.GPT2Config(
            n_embd=d_model, n_layer=n_layers, n_head=n_heads, n_positions=cfg["n_ctx"],
            n_inner=4 * d_model if attn_only else cfg["d_mlp"], layer_norm_epsilon=eps,
            activation_function="gelu_new",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **shape,
        )  # fmt: skip
    elif name == "GPTNeoXForCausalLM":
        _require(cfg, "rotary_adjacent_pairs", (False,), False)
        _require(cfg, "rotary_dim", (d_head,), d_head)
        hf_cfg = transformers.GPTNeoXConfig(
            hidden_size=d_model, num_hidden_layers=n_layers, num_attention_heads=n_heads,
            intermediate_size=4 * d_model if attn_only else cfg["d_mlp"], hidden_act="gelu_new",
            max_position_embeddings=cfg["n_ctx"], layer_norm_eps=eps, use_parallel_residual=False,
            attention_bias=True, rope_parameters={
                "rope_type": "default", "rope_theta": float(cfg.get("rotary_base", 10000)),
                "partial_rotary_factor": 1.0,
            }, **shape,
        )  # fmt: skip
    else:
        _require(cfg, "rotary_adjacent_pairs", (False,), False)
        _require(cfg, "rotary_dim", (d_head,), d_head)
        hf_cfg = transformers.LlamaConfig(
            hidden_size=d_model, intermediate_size=4 * d_model, num_hidden_layers=n_layers,
            num_attention_heads=n_heads, num_key_value_heads=n_heads, head_dim=d_head,
            max_position_embeddings=cfg["n_ctx"], rms_norm_eps=eps, attention_bias=True,
            rope_theta=float(cfg.get("rotary_base", 10000)), **shape,
        )  # fmt: skip
    dtype = state["embed.W_E"].dtype
    hf = getattr(transformers, name)(hf_cfg).to(dtype).eval()
    # HookedTransformer's unembedding has a bias; no family's output layer does.
    hf.lm_head = head = nn.Linear(d_model, cfg["d_vocab"], bias=True, dtype=dtype)
    read = _Reads(state)
    with torch.no_grad():
        for p in hf.parameters():
            p.zero_()  # the MLPs stay zero: an attention-only model's MLP adds nothing
        try:
            _FILL[name](hf, read, n_layers)
            if not attn_only:
                (_fill_neox_mlps if name == "GPTNeoXForCausalLM" else _fill_gpt2_mlps)(hf, read)
            head.weight.copy_(read["unembed.W_U"].T)
            head.bias.copy_(read["unembed.b_U"])
        except RuntimeError as e:  # a shape that disagrees with the config
            raise ValueError(f"the weights do not match the config: {e}") from None
    # Buffers HookedTransformer recomputes (masks, rotary tables) carry no weights.
    unused = sorted(k for k in set(state) - read.seen if not k.endswith(_BUFFERS))
    if unused:
        raise ValueError(f"the weights do not match the config: unexpected {unused[:5]}")
    return hf, hf_cfg, name


_BUFFERS = (".IGNORE", ".mask", ".rotary_sin", ".rotary_cos")


class _Reads(dict):
    """The state dict, remembering which entries were read (the rest must be buffers)."""

    def __init__(self, state: dict[str, Tensor]) -> None:
        super().__init__(state)
        self.seen: set[str] = set()

    def __getitem__(self, key: str) -> Tensor:
        if key not in self:
            raise ValueError(f"the weights do not match the config: {key!r} is missing")
        self.seen.add(key)
        return super().__getitem__(key)


def _heads_in(w: Tensor) -> Tensor:
    """[head, d_model, d_head] → [d_model, head·d_head] (x @ it gives the heads side by side)."""
    return einops.rearrange(w, "head d_model d_head -> d_model (head d_head)")


def _fill_gpt2(hf: nn.Module, s: dict[str, Tensor], n_layers: int) -> None:
    t = hf.transformer
    t.wte.weight.copy_(s["embed.W_E"])
    t.wpe.weight.copy_(s["pos_embed.W_pos"])
    for layer, block in enumerate(t.h):
        p = f"blocks.{layer}."
        block.ln_1.weight.copy_(s[p + "ln1.w"])
        block.ln_1.bias.copy_(s[p + "ln1.b"])
        block.ln_2.weight.fill_(1.0)  # reads into the zero MLP
        attn = block.attn  # Conv1D: x @ weight + bias
        attn.c_attn.weight.copy_(torch.cat([_heads_in(s[p + f"attn.W_{m}"]) for m in "QKV"], dim=1))
        attn.c_attn.bias.copy_(torch.cat([s[p + f"attn.b_{m}"].reshape(-1) for m in "QKV"]))
        attn.c_proj.weight.copy_(
            einops.rearrange(s[p + "attn.W_O"], "head d_head d_model -> (head d_head) d_model")
        )
        attn.c_proj.bias.copy_(s[p + "attn.b_O"])
    t.ln_f.weight.copy_(s["ln_final.w"])
    t.ln_f.bias.copy_(s["ln_final.b"])


def _fill_gpt2_mlps(hf: nn.Module, s: dict[str, Tensor]) -> None:
    for layer, block in enumerate(hf.transformer.h):
        p = f"blocks.{layer}."
        block.ln_2.weight.copy_(s[p + "ln2.w"])
        block.ln_2.bias.copy_(s[p + "ln2.b"])
        block.mlp.c_fc.weight.copy_(s[p + "mlp.W_in"])  # Conv1D: x @ weight, as W_in
        block.mlp.c_fc.bias.copy_(s[p + "mlp.b_in"])
        block.mlp.c_proj.weight.copy_(s[p + "mlp.W_out"])
        block.mlp.c_proj.bias.copy_(s[p + "mlp.b_out"])


def _fill_llama(hf: nn.Module, s: dict[str, Tensor], n_layers: int) -> None:
    m = hf.model
    m.embed_tokens.weight.copy_(s["embed.W_E"])
    for layer, block in enumerate(m.layers):
        p = f"blocks.{layer}."
        block.input_layernorm.weight.copy_(s[p + "ln1.w"])
        block.post_attention_layernorm.weight.fill_(1.0)  # reads into the zero MLP
        attn = block.self_attn  # Linear: x @ weight.T + bias
        for mat, proj in zip("QKV", (attn.q_proj, attn.k_proj, attn.v_proj), strict=True):
            proj.weight.copy_(_heads_in(s[p + f"attn.W_{mat}"]).T)
            proj.bias.copy_(s[p + f"attn.b_{mat}"].reshape(-1))
        attn.o_proj.weight.copy_(
            einops.rearrange(s[p + "attn.W_O"], "head d_head d_model -> d_model (head d_head)")
        )
        attn.o_proj.bias.copy_(s[p + "attn.b_O"])
    m.norm.weight.copy_(s["ln_final.w"])


def _fill_neox(hf: nn.Module, s: dict[str, Tensor], n_layers: int) -> None:
    m = hf.gpt_neox
    m.embed_in.weight.copy_(s["embed.W_E"])
    for layer, block in enumerate(m.layers):
        p = f"blocks.{layer}."
        block.input_layernorm.weight.copy_(s[p + "ln1.w"])
        block.input_layernorm.bias.copy_(s[p + "ln1.b"])
        block.post_attention_layernorm.weight.fill_(1.0)  # reads into the zero MLP
        attn = block.attention  # one Linear whose output is, per head, q, k and v side by side
        w = torch.stack([s[p + f"attn.W_{mat}"] for mat in "QKV"], dim=1)
        b = torch.stack([s[p + f"attn.b_{mat}"] for mat in "QKV"], dim=1)
        attn.query_key_value.weight.copy_(
            einops.rearrange(w, "head qkv d_model d_head -> (head qkv d_head) d_model")
        )
        attn.query_key_value.bias.copy_(b.reshape(-1))
        attn.dense.weight.copy_(
            einops.rearrange(s[p + "attn.W_O"], "head d_head d_model -> d_model (head d_head)")
        )
        attn.dense.bias.copy_(s[p + "attn.b_O"])
    m.final_layer_norm.weight.copy_(s["ln_final.w"])
    m.final_layer_norm.bias.copy_(s["ln_final.b"])


def _fill_neox_mlps(hf: nn.Module, s: dict[str, Tensor]) -> None:
    for layer, block in enumerate(hf.gpt_neox.layers):
        p = f"blocks.{layer}."
        block.post_attention_layernorm.weight.copy_(s[p + "ln2.w"])
        block.post_attention_layernorm.bias.copy_(s[p + "ln2.b"])
        block.mlp.dense_h_to_4h.weight.copy_(s[p + "mlp.W_in"].T)  # Linear: x @ weight.T
        block.mlp.dense_h_to_4h.bias.copy_(s[p + "mlp.b_in"])
        block.mlp.dense_4h_to_h.weight.copy_(s[p + "mlp.W_out"].T)
        block.mlp.dense_4h_to_h.bias.copy_(s[p + "mlp.b_out"])


_FILL = {"GPT2LMHeadModel": _fill_gpt2, "GPTNeoXForCausalLM": _fill_neox,
         "LlamaForCausalLM": _fill_llama}  # fmt: skip
