"""The same weights as a HookedTransformer and as a TransformerBridge: qk_attribution after
capture as a fraction of each model's forward, and the table on each, measured in one run.

Workload: a random gpt2-small-shaped GPT-2 (Hugging Face ``GPT2LMHeadModel``, 12 layers × 768 ×
12 heads), converted to a HookedTransformer with TransformerLens's own weight conversion (norms
not folded) and wrapped as a bridge; a TopK SAE (d_sae 24576, k 64) on layer 6's residual for
both; a 128-token prompt. Each round runs both models back to back, in alternating order: a
forward, one qk_attribution (its caches cold from the forward), the same call again, a table.
The table ratio is the median over rounds of each round's back-to-back ratio, which cancels
the drift of a shared machine that a best-of-n taken separately per model does not.

    python benchmarks/bench_bridge.py [--tokens 128] [--d-sae 24576] [--rounds 15]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--d-sae", type=int, default=24576)
    ap.add_argument("--k", type=int, default=64)
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if args.rounds < 2:  # the table ratio's quartiles need two rounds
        ap.error(f"--rounds must be at least 2, got {args.rounds}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    import transformers
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.model_bridge import sources
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    import qk_lens

    hf_cfg = transformers.GPT2Config(n_embd=768, n_layer=12, n_head=12, n_positions=1024)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    cfg = HookedTransformerConfig(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024,
        d_vocab=hf_cfg.vocab_size, act_fn="gelu_new", normalization_type="LN",
        dtype=torch.float32,
    )  # fmt: skip
    hooked = HookedTransformer(cfg)
    hooked.load_state_dict(convert_gpt2_weights(hf, cfg), strict=False)
    hooked = qk_lens.attach(hooked.eval())
    bridge = qk_lens.attach(
        sources.build_bridge_from_module(hf, "GPT2LMHeadModel", hf_config=hf_cfg)
    )
    L, T = args.layer, args.tokens
    sae = TopKSAE(
        TopKSAEConfig(
            d_in=768, d_sae=args.d_sae, k=args.k,
            metadata=SAEMetadata(hook_name=f"blocks.{L}.hook_resid_pre"),
        )
    )  # fmt: skip
    with torch.no_grad():
        sae.b_dec.normal_(0, 0.1)
    models = {"HookedTransformer": hooked, "TransformerBridge": bridge}
    for m in models.values():
        m.add_dictionary(sae)
    tokens = torch.randint(0, cfg.d_vocab, (T,))

    # the same weights: the same scores
    a = hooked.qk_attribution(tokens, L, 3, T - 1, T // 2)
    b = bridge.qk_attribution(tokens, L, 3, T - 1, T // 2)
    a.check(), b.check()
    print(f"same weights: score {a.score:.6f} (HookedTransformer) vs {b.score:.6f} (bridge)")

    times: dict[str, dict[str, list[float]]] = {n: {} for n in models}

    def timed(name: str, what: str, fn) -> None:
        t0 = time.perf_counter()
        fn()
        times[name].setdefault(what, []).append(time.perf_counter() - t0)

    for m in models.values():  # warm: captures, decompositions, the kernel
        m.qk_attribution_table(tokens, L, top_k=32)
    names = list(models)
    for r in range(args.rounds):
        # alternate which model goes first, so that neither always runs on a warmer cache
        for name in names if r % 2 == 0 else names[::-1]:
            m = models[name]
            timed(name, "forward", lambda m=m: m(tokens[None], return_type=None))
            timed(name, "attribution", lambda m=m: m.qk_attribution(tokens, L, 3, T - 1, T // 2))
            # the same call again at once: what a loop over heads or keys pays per call
            timed(name, "again", lambda m=m: m.qk_attribution(tokens, L, 3, T - 1, T // 2))
            timed(name, "table", lambda m=m: m.qk_attribution_table(tokens, L, top_k=32))

    med = {n: {w: statistics.median(v) for w, v in d.items()} for n, d in times.items()}
    for name in models:
        f, at, again = med[name]["forward"], med[name]["attribution"], med[name]["again"]
        print(
            f"{name:18s} forward {f * 1e3:7.1f} ms   one qk_attribution after capture "
            f"{at * 1e3:5.2f} ms = {100 * at / f:.2f} % of its forward (target ≤ 1 %), "
            f"called again at once {again * 1e3:5.2f} ms = {100 * again / f:.2f} %   "
            f"table {med[name]['table']:.2f} s (median of {args.rounds})"
        )
    # each round's two tables ran back to back: their ratio cancels the machine's drift
    paired = [
        b / h
        for b, h in zip(
            times["TransformerBridge"]["table"], times["HookedTransformer"]["table"], strict=True
        )
    ]
    q = statistics.quantiles(paired, n=4)
    print(
        f"table on the bridge / on the HookedTransformer: {statistics.median(paired):.3f} "
        f"(median of {len(paired)} rounds, each ratio of back-to-back runs; quartiles "
        f"{q[0]:.3f}–{q[2]:.3f}; target within 10 %)"
    )


if __name__ == "__main__":
    main()
