"""Convergence of the covariance statistics on SmolLM2-135M: relative Frobenius change
‖C_2n − C_n‖_F / ‖C_2n‖_F of C = E[k kᵀ] between n and 2n tokens, per layer, and time per token.

One forward pass over the whole seeded sample (stopping at the deepest layer asked for): the sample for
n tokens is a prefix of the sample for 2n (see editlab.stats.covariance), so C_n is the running sum at n
tokens of the same pass, exactly what `second_moments(n_tokens=n)` computes.

    python benchmarks/bench_stats_convergence.py [--layers 2 4 6 8] [--seed 0] [--max-tokens N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 6, 8])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--start", type=int, default=25_000, help="smallest n (doubled up to the corpus size)")
    ap.add_argument("--max-tokens", type=int, default=None, help="cap the sample (default: whole corpus)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = ap.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from editlab.models import load_lm
    from editlab.stats import get_corpus
    from editlab.stats.covariance import accumulate_moments, sample_windows, sink_policy

    lm = load_lm(args.model)
    corpus = get_corpus()
    t0 = time.perf_counter()
    windows = sample_windows(lm, corpus, args.max_tokens, args.seq_len, args.seed)
    t_tok = time.perf_counter() - t0
    policy = sink_policy(lm)
    total = sum(len(w.ids) for w in windows) - (0 if policy["head"] else len(windows))
    sizes = []
    n = args.start
    while 2 * n <= total:
        sizes += [n, 2 * n]
        n *= 2
    if total // 2 >= args.start:
        sizes += [total // 2, total]
    pairs = sorted({(sizes[i], sizes[i + 1]) for i in range(0, len(sizes), 2)})
    print(f"model {args.model}  corpus {corpus.name} ({len(corpus.texts)} documents)  tokens in sample {total}  "
          f"windows {len(windows)} x <= {args.seq_len}  seed {args.seed}  head {policy['head']}  "
          f"positions left out per window {policy['skip']}  threads {torch.get_num_threads()}")
    print(f"tokenization + sampling {t_tok:.1f} s")

    header = f"{'n':>8} {'2n':>8} | " + " ".join(f"{'L' + str(l):>7}" for l in args.layers) + " | elapsed"
    print("\nrelative Frobenius change ||C_2n - C_n|| / ||C_2n|| (percent); rows printed as the pass reaches 2n")
    print(header)
    print("-" * len(header), flush=True)
    sums: dict[int, dict[int, torch.Tensor]] = {}
    t0 = time.perf_counter()

    def report(c: int, per_layer: dict[int, torch.Tensor]) -> None:
        sums[c] = {l: s.clone() for l, s in per_layer.items()}
        for a, b in pairs:
            if b == c and a in sums:
                row = []
                for l in args.layers:
                    ca, cb = sums[a][l] / a, sums[b][l] / b
                    row.append(f"{100 * float(torch.linalg.norm(cb - ca) / torch.linalg.norm(cb)):7.2f}")
                print(f"{a:>8} {b:>8} | " + " ".join(row) + f" | {time.perf_counter() - t0:7.0f} s", flush=True)

    _, count = accumulate_moments(
        lm, args.layers, windows, checkpoints=sorted(set(sizes)), progress=False, on_checkpoint=report
    )
    elapsed = time.perf_counter() - t0
    assert count == total, (count, total)
    deepest = max(args.layers)
    print(f"\none pass over {count} tokens up to layer {deepest} (keys of {len(args.layers)} layers accumulated): "
          f"{elapsed:.1f} s = {1e3 * elapsed / count:.3f} ms/token ({count / elapsed:.0f} tokens/s)")


if __name__ == "__main__":
    main()
