"""A 64-token transcoder graph on a gpt2-small-shaped model and the head loadings of all its
edges; then the same for a cross-layer transcoder.

Workload: a random gpt2-small-shaped HookedTransformer (12 layers × 768 × 12 heads, d_mlp 3072),
per-layer TopK transcoders of 24,576 features (k active per position and layer, ``--k``) on
every MLP, random tokens; then a CLT of the same width. The graph's rows: the logits and the
``--max-feature-nodes`` most influential features (circuit-tracer's choice, batch by batch);
pruning at circuit-tracer's defaults (0.8 / 0.98). Each case runs in its own process, so its
peak RSS is its own; the forward pass is timed in the same process for the ratio.

    python benchmarks/bench_transcoder_graph.py [--tokens 64] [--k 32] [--max-feature-nodes 1024]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore")


def one(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    from transformer_lens import HookedTransformerConfig

    import qk_lens
    from qk_lens.graph import transcoder_graph, transcoder_loadings
    from qk_lens.transcoders import Transcoders

    cfg = HookedTransformerConfig(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=1024,
        d_vocab=50257, act_fn="gelu_new", normalization_type="LN", seed=0,
    )  # fmt: skip
    model = qk_lens.HookedQKTransformer(cfg).eval()
    n, d, F = 12, 768, args.d_transcoder
    g = torch.Generator().manual_seed(0)
    cross = args.case == "clt"

    def r(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    tc = Transcoders(
        name=f"random-{args.case}",
        cross_layer=cross,
        input_point="mlp_input",
        output_point="mlp_out",
        W_enc=[r(d, F, scale=d**-0.5) for _ in range(n)],
        b_enc=[torch.zeros(F) for _ in range(n)],
        W_dec=[r(F, n - lyr, d, scale=0.02) if cross else r(F, d, scale=0.02) for lyr in range(n)],
        b_dec=[torch.zeros(d) for _ in range(n)],
        activation="topk",
        k=args.k,
    )
    model.add_transcoders(tc)
    tokens = torch.randint(0, cfg.d_vocab, (args.tokens,), generator=g)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    t0 = time.perf_counter()
    with torch.no_grad():
        model(tokens[None])
    t_fwd = time.perf_counter() - t0
    t0 = time.perf_counter()
    graph = transcoder_graph(
        model, tokens, max_feature_nodes=args.max_feature_nodes, max_n_logits=10
    )
    t_graph = time.perf_counter() - t0
    t0 = time.perf_counter()
    hl = transcoder_loadings(model, graph)
    t_load = time.perf_counter() - t0
    err = hl.check()
    split = tc.split(model, model.qk_capture(tokens))
    return {
        "case": args.case,
        "active_features": split.n_features,
        "rows": graph.metadata["n_rows"],
        "nodes": graph.n_nodes,
        "edges": graph.n_edges,
        "forward_s": t_fwd,
        "graph_s": t_graph,
        "loadings_s": t_load,
        "loadings_check": err,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_before_gib": rss0,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--d-transcoder", type=int, default=24576)
    ap.add_argument("--max-feature-nodes", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cases", nargs="+", default=["per-layer", "clt"])
    ap.add_argument("--case", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.case:
        print(json.dumps(one(args)))
        return
    print(f"{args.tokens} tokens, {args.d_transcoder} features per layer (TopK k={args.k}), "
          f"rows: logits + {args.max_feature_nodes} features, {args.threads} threads")  # fmt: skip
    for case in args.cases:
        cmd = [sys.executable, __file__, "--case", case] + [
            f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("case", "cases")
        ]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{res['case']:>9}: {res['active_features']} active features, {res['rows']} rows, "
            f"pruned to {res['nodes']} nodes / {res['edges']} edges; forward "
            f"{res['forward_s']:.2f} s, graph {res['graph_s']:.1f} s "
            f"({res['graph_s'] / res['forward_s']:.0f}× the forward), head loadings of all "
            f"edges {res['loadings_s']:.1f} s (check {res['loadings_check']:.1e}); peak RSS "
            f"{res['peak_rss_gib']:.1f} GiB ({res['rss_before_gib']:.1f} with the weights)"
        )


if __name__ == "__main__":
    main()
