"""Default sampling settings of the covariance statistics, torch-free so that hyper-parameter classes can
name them without importing torch."""

# Default token budget (docs/statistics.md, benchmarks/bench_stats_convergence.py). On SmolLM2-135M the
# relative Frobenius change of C between n and 2n tokens falls as 1/sqrt(n) and is still 11.5% at layer 6
# for 100k -> 200k (measured), so <= 5% needs about 530k tokens (extrapolated): on the offline corpus
# (542k tokens) this means all of it.
DEFAULT_N_TOKENS = 600_000
DEFAULT_SEED = 0
