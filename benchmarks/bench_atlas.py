"""Speed of the head atlas on a gpt2-small-shaped model, as ratios to one forward pass in this run.

Workload (issue 6): random-init 12 layers × d_model 768 × 12 heads × d_head 64, d_vocab 50257,
LayerNorm (unfolded). Prints the time of each weight-level stage (norm-folded weights, the
vocabulary moments, spectra + eigenvalue scores, composition scores with their baseline and the
virtual heads), of the pattern probes (32 probes ``BOS, s, s`` with |s| = 32), of the whole
``head_atlas`` call, and of one forward pass over a [1, 256] prompt, each time also as a multiple
of that forward.

    python benchmarks/bench_atlas.py [--threads 2] [--n-probes 32] [--probe-length 32]
"""

from __future__ import annotations

import argparse
import warnings

import torch
from _measure import PeakRSS, best_of

warnings.filterwarnings("ignore")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--n-probes", type=int, default=32)
    ap.add_argument("--probe-length", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from qk_lens import atlas as A
    from qk_lens.arch import arch_of
    from qk_lens.atlas import composition as C
    from qk_lens.atlas import pattern_level as P
    from qk_lens.atlas import weights as W
    from qk_lens.atlas.probes import repeated_random_tokens

    cfg = HookedTransformerConfig(
        n_layers=12, d_model=768, n_heads=12, d_head=64, d_mlp=3072, d_vocab=50257, n_ctx=1024,
        act_fn="gelu_new", normalization_type="LN", dtype=torch.float32,
    )  # fmt: skip
    model = HookedTransformer(cfg)
    model.eval()
    dtype = arch_of(model).dtype
    tokens = torch.randint(0, cfg.d_vocab, (1, 256))

    with torch.no_grad():
        model(tokens)  # warm-up
        t_fwd = best_of(lambda: model(tokens), args.repeats)

        stages: dict[str, float] = {}

        def stage(name, fn):
            result = None

            def keep():
                nonlocal result
                result = fn()

            stages[name] = best_of(keep, args.repeats)
            return result

        weights = stage("norm-folded weights", lambda: W.HeadWeights.from_model(model, dtype))
        moments = stage(
            "vocabulary moments (W_U Ê, ÊᵀÊ)", lambda: W.TokenMoments.from_model(model, dtype)
        )
        factors, (scores, spectra) = stage(
            "spectra, eigenvalue scores, same-token",
            lambda: (f := weights.factors(), W.weight_scores(weights, f, moments)),
        )

        def composition():
            raw = C.composition_scores(weights, factors)
            comp = A.Composition.from_scores(raw, spectra.qk_singular, spectra.ov_singular, 767)
            return C.virtual_heads(weights, moments, comp, scores["ov_copying"], 3.0)

        stage("composition (Q, K, V) + baseline + virtual heads", composition)
        weight_total = sum(stages.values())

        probes = repeated_random_tokens(model, n=args.n_probes, length=args.probe_length)
        t_patterns = best_of(
            lambda: P.pooled_pattern_scores(model, [probes], [args.probe_length], 16, False),
            args.repeats,
        )

    def run_atlas():
        return A.head_atlas(model, n_probes=args.n_probes, probe_length=args.probe_length)

    t_total = best_of(run_atlas, args.repeats)
    with PeakRSS() as mem:  # a separate run: the sampling thread would perturb the timing
        atlas = run_atlas()

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32")
    print("model: gpt2-small shape (12 layers, 12 heads, d_model 768, d_vocab 50257), LN unfolded")

    def line(label: str, seconds: float, extra: str = "") -> None:
        print(f"{label:<52} {seconds:7.2f} s {seconds / t_fwd:7.1f} forwards{extra}")

    line("one forward pass [1, 256]", t_fwd)
    for name, t in stages.items():
        line("  " + name, t)
    line("weight-level atlas (sum of the stages above)", weight_total)
    line(f"pattern probes ({args.n_probes} x {1 + 2 * args.probe_length} tokens)", t_patterns)
    line("head_atlas(model), end to end", t_total, f", peak extra {mem.extra / 2**20:.0f} MiB")
    n_labelled = int((atlas.frame["labels"].map(len) > 0).sum())
    print(f"rows: {len(atlas.frame)}, labelled heads: {n_labelled}")


if __name__ == "__main__":
    main()
