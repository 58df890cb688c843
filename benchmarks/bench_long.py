"""Long context: the run's table of one layer (all heads, pairs with attention ≥ 0.01, top-32
terms) streamed to Parquet at 1024, 2048 and 4096 tokens, as a ratio to the model's forward at
each length, with peak memory and the fitted scaling exponents.

Workload: a random gpt2-small-shaped HookedTransformer (12 layers × 768 × 12 heads, n_ctx 4096)
with W_Q scaled by ``--qk-gain`` (a random model's attention is nearly uniform, so at 4096
tokens almost no key gets 0.01; the gain makes patterns peaked, as a trained model's are), a
TopK SAE (d_sae 24,576, k 64) on layer 6's residual, random tokens. Each length runs in its own
process, so its peak RSS is its own. The table goes through the run's own path
(``qk_lens.batch.work.part_tables`` inside ``capture_scope``, ``qk_lens.batch.store.write_part``),
``query_chunk`` query positions at a time.

    python benchmarks/bench_long.py [--lengths 1024 2048 4096] [--qk-gain 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")


def one(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata
    from transformer_lens import HookedTransformerConfig

    import qk_lens
    from qk_lens.batch.config import parse_config
    from qk_lens.batch.store import write_part
    from qk_lens.batch.work import TABLE_SCHEMA, Part, part_tables

    T, L = args.one, args.layer
    cfg = HookedTransformerConfig(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, n_ctx=4096,
        d_vocab=50257, act_fn="gelu_new", normalization_type="LN", seed=0,
    )  # fmt: skip
    model = qk_lens.HookedQKTransformer(cfg).eval()
    with torch.no_grad():
        for block in model.blocks:
            block.attn.W_Q.mul_(args.qk_gain)
    sae = TopKSAE(
        TopKSAEConfig(
            d_in=768,
            d_sae=24576,
            k=64,
            metadata=SAEMetadata(hook_name=f"blocks.{L}.hook_resid_pre"),
        )
    )
    model.add_dictionary(sae)
    tokens = torch.randint(0, cfg.d_vocab, (T,))
    run_cfg = parse_config(
        {
            "name": "bench-long",
            "model": {"name": "in-memory"},
            "prompts": {"file": "-"},
            "compute": {"table": {"layers": [L], "top_k": 32, "min_prob": 0.01,
                                  "query_chunk": args.query_chunk}},
            "output": {"dir": "-"},
        }
    )  # fmt: skip

    forwards = []
    for _ in range(2):
        t0 = time.perf_counter()
        with torch.no_grad():
            model(tokens[None], return_type=None)
        forwards.append(time.perf_counter() - t0)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(args.repeats):  # the machine is noisy: the best of a few
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            part = Part(0, 0, (tokens.tolist(),))
            tables = part_tables(model, run_cfg, part)  # capture included: a run pays for it
            rows = write_part(Path(tmp), "bench", 0, 0, 1, tables, {"table": TABLE_SCHEMA})["table"]
            times.append(time.perf_counter() - t0)
            size = (Path(tmp) / "table" / "part-00000.parquet").stat().st_size
    seconds = min(times)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {
        "tokens": T,
        "forward_s": min(forwards),
        "table_runs_s": times,
        "table_s": seconds,
        "rows": rows,
        "parquet_mib": size / 2**20,
        "peak_rss_mib": peak / 1024,
        "rss_before_table_mib": rss_before / 1024,
    }


def fit(xs: list[float], ys: list[float]) -> float:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--layer", type=int, default=6)
    ap.add_argument("--qk-gain", type=float, default=8.0)
    ap.add_argument("--query-chunk", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print("RESULT " + json.dumps(one(args)), flush=True)
        return
    results = []
    for T in args.lengths:
        cmd = [sys.executable, __file__, "--one", str(T), "--layer", str(args.layer),
               "--qk-gain", str(args.qk_gain), "--query-chunk", str(args.query_chunk),
               "--threads", str(args.threads), "--repeats", str(args.repeats)]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        r = json.loads(next(ln for ln in out.splitlines() if ln.startswith("RESULT "))[7:])
        results.append(r)
        print(
            f"{T:5d} tokens: forward {r['forward_s']:6.2f} s, table {r['table_s']:6.2f} s "
            f"= {r['table_s'] / r['forward_s']:5.2f} × the forward, {r['rows']:,} rows "
            f"({r['parquet_mib']:.1f} MiB Parquet), peak RSS {r['peak_rss_mib']:,.0f} MiB "
            f"(before the table {r['rss_before_table_mib']:,.0f} MiB)",
            flush=True,
        )
    if len(results) >= 2:
        n = [r["tokens"] for r in results]
        print(
            f"fitted exponents over {n}: table time ∝ T^{fit(n, [r['table_s'] for r in results]):.2f}, "
            f"forward ∝ T^{fit(n, [r['forward_s'] for r in results]):.2f}, "
            f"rows ∝ T^{fit(n, [r['rows'] for r in results]):.2f}, "
            f"peak RSS ∝ T^{fit(n, [r['peak_rss_mib'] for r in results]):.2f}"
        )


if __name__ == "__main__":
    main()
