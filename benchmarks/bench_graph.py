"""Time and peak memory of a checkpointed attribution graph and its head loadings.

gpt2-small-shaped random model (12 layers, d_model 768, 12 heads, d_mlp 3072, vocab 50257),
random TopK SAEs (k 32, d_sae 24576 like gpt2-small-res-jb) on every ``blocks.L.hook_resid_pre``,
a 64-token prompt. Prints the time of one plain forward pass, of building the graph (capture +
decompositions + all edges + pruning) and of the head loadings, their ratios to the forward, and
peak RSS (sampled every 5 ms) above the RSS after setup.

    python benchmarks/bench_graph.py [--tokens 64] [--k 32] [--d-sae 24576] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
from _measure import PeakRSS


def build(n_tokens: int, k: int, d_sae: int, seed: int = 0):
    from sae_lens.saes import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    import qk_lens

    cfg = HookedTransformerConfig(
        n_layers=12,
        d_model=768,
        n_heads=12,
        d_head=64,
        d_mlp=3072,
        d_vocab=50257,
        n_ctx=1024,
        act_fn="gelu_new",
        normalization_type="LN",
        tokenizer_name=None,
        seed=seed,
        model_name="gpt2-small-shaped-random",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = qk_lens.attach(HookedTransformer(cfg))
    model.eval()
    g = torch.Generator().manual_seed(seed)
    for layer in range(cfg.n_layers):
        sae = TopKSAE(
            TopKSAEConfig(
                d_in=768,
                d_sae=d_sae,
                k=k,
                metadata=SAEMetadata(hook_name=f"blocks.{layer}.hook_resid_pre"),
            )
        )
        with torch.no_grad():
            w = torch.randn(d_sae, 768, generator=g)
            sae.W_dec.copy_(w / w.norm(dim=-1, keepdim=True))
            sae.W_enc.copy_(sae.W_dec.T)
            sae.b_enc.copy_(0.01 * torch.randn(d_sae, generator=g))
        model.add_dictionary(sae)
    tokens = torch.randint(0, cfg.d_vocab, (n_tokens,), generator=g)
    return model, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--d-sae", type=int, default=24576)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from qk_lens.graph import attribution_graph, head_loadings

    t0 = time.perf_counter()
    model, tokens = build(args.tokens, args.k, args.d_sae)
    setup = time.perf_counter() - t0

    with torch.no_grad():
        model(tokens[None])  # warm-up
        times = []
        for _ in range(3):
            t = time.perf_counter()
            model(tokens[None])
            times.append(time.perf_counter() - t)
    forward = sorted(times)[1]

    model.clear_qk_cache()
    with PeakRSS() as mem_graph:
        t = time.perf_counter()
        graph = attribution_graph(model, tokens, batch_size=args.batch_size)
        t_graph = time.perf_counter() - t
    with PeakRSS() as mem_load:
        t = time.perf_counter()
        loadings = head_loadings(model, graph)
        t_load = time.perf_counter() - t
    err = loadings.check()

    meta = graph.metadata
    print(
        f"setup {setup:.1f} s | model gpt2-small shape, {args.tokens} tokens, TopK k={args.k} "
        f"d_sae={args.d_sae} at 12 layers, {args.threads} threads, torch {torch.__version__}"
    )
    print(
        f"full graph: {meta['n_nodes_full']} nodes, {meta['n_edges_full']} nonzero edges; "
        f"pruned: {graph.n_nodes} nodes, {graph.n_edges} edges"
    )
    print(f"forward pass (median of 3)   {forward * 1e3:8.1f} ms")
    print(
        f"attribution_graph            {t_graph:8.2f} s  ({t_graph / forward:6.0f}× forward)  "
        f"peak RSS +{mem_graph.delta_mib:.0f} MiB"
    )
    print(
        f"head_loadings ({graph.n_edges} edges) {t_load:8.2f} s  ({t_load / forward:6.0f}× forward)  "
        f"peak RSS +{mem_load.delta_mib:.0f} MiB"
    )
    print(f"both                         {t_graph + t_load:8.2f} s   (target < 60 s)")
    print(f"loadings invariant: max error {err:.2e}; process RSS {mem_load.peak / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
