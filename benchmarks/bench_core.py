"""Speed of the core library on SmolLM2-135M (CPU): ROME time per edit (statistics cached), MEMIT
batch time, CounterFact evaluation throughput, covariance throughput, and peak memory of a ROME edit.

    python benchmarks/bench_core.py [--rome-edits 10] [--memit-batch 100] [--eval-records 40]
        [--model smollm2-135m] [--device cuda] [--dtype bfloat16]   # GPU figures beside the CPU ones
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from common import ROOT, med, peak_rss_mb, timed


def rome_peak_memory(n: int) -> float:
    """Peak RSS (MB) of a fresh process that loads the model and runs `n` ROME edits."""
    code = (
        "import sys; sys.path.insert(0, %r)\n"
        "from common import peak_rss_mb\n"
        "from editlab import load_lm, get_editor\nfrom editlab.data import load_requests\n"
        "lm = load_lm('smollm2-135m'); reqs = load_requests('counterfact', limit=%d)\n"
        "for r in reqs: get_editor('rome').apply(lm, r).restore()\n"
        "print(peak_rss_mb())\n" % (str(ROOT / "benchmarks"), n)
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def matmul_peak_gflops(n: int = 1536, reps: int = 20) -> float:
    """Best float32 GEMM throughput of this machine (torch's threads), as a ceiling for the model."""
    import time

    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9


class TokenCounter:
    """Counts the tokens (attention-mask ones) the LM runs through the whole model."""

    def __init__(self, lm) -> None:
        self.lm, self.n = lm, 0
        self._orig = lm.hidden_states

        def counted(ids, mask):
            self.n += int(mask.sum())
            return self._orig(ids, mask)

        lm.hidden_states = counted

    def close(self) -> None:
        del self.lm.hidden_states


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rome-edits", type=int, default=10)
    ap.add_argument("--memit-batch", type=int, default=100)
    ap.add_argument("--eval-records", type=int, default=40)
    ap.add_argument("--skip-memit", action="store_true")
    ap.add_argument("--model", default="smollm2-135m", help="e.g. a 1-2B model folder on a GPU machine")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16")
    args = ap.parse_args()

    from editlab import get_editor, load_lm
    from editlab.data import load_requests
    from editlab.errors import EditlabError
    from editlab.eval import evaluate_requests, pre_edit
    from editlab.models.loading import check_dtype_on_device, resolve_device, resolve_dtype
    from editlab.stats import get_corpus, second_moments

    try:  # a device or dtype this machine lacks: one line, before any work
        check_dtype_on_device(resolve_dtype(args.dtype), resolve_device(args.device))
    except EditlabError as e:
        raise SystemExit(f"bench_core: {e}")
    figures: dict[str, float] = {}
    figures["matmul_peak_gflops"] = matmul_peak_gflops()
    lm, t_load = timed(load_lm, args.model, device=args.device, dtype=args.dtype)
    figures["model"], figures["device"], figures["dtype"] = args.model, args.device, args.dtype  # type: ignore[assignment]
    figures["load_s"] = t_load

    # covariance throughput for an early layer, in a throwaway cache so it is really computed
    import os

    with tempfile.TemporaryDirectory() as tmp:
        old = os.environ.get("EDITLAB_HOME")
        os.environ["EDITLAB_HOME"] = tmp
        corpus = get_corpus()
        fresh = load_lm(args.model, device=args.device, dtype=args.dtype)
        _, t_cov = timed(second_moments, fresh, [2], corpus, 30_000, progress=False)
        figures["covariance_tokens_per_s_layer2"] = 30_000 / t_cov
        if old is None:
            del os.environ["EDITLAB_HOME"]
        else:
            os.environ["EDITLAB_HOME"] = old
        del fresh

    reqs = load_requests("counterfact", limit=max(args.rome_edits, args.memit_batch, args.eval_records))
    rome = get_editor("rome")
    rome.apply(lm, reqs[0]).restore()  # statistics + context templates cached
    times, steps = [], []
    for r in reqs[: args.rome_edits]:
        e, t = timed(rome.apply, lm, r)
        times.append(t)
        steps.append(e.info["steps"][0])
        e.restore()
    figures["rome_median_s_per_edit"] = med(times)
    figures["rome_mean_opt_steps"] = sum(steps) / len(steps)

    ev = reqs[: args.eval_records]
    _, t_pre = timed(pre_edit, lm, ev)
    _, t_batch = timed(evaluate_requests, lm, ev, pre_edit(lm, ev))
    figures["eval_records_per_s_batched"] = len(ev) / t_batch
    pre = pre_edit(lm, ev)
    one = []
    counter = TokenCounter(lm)
    for r in ev[:10]:
        _, t = timed(evaluate_requests, lm, [r], pre)
        one.append(t)
    counter.close()
    figures["eval_records_per_s_one_at_a_time"] = 1 / med(one)
    # the distance to the limit: tokens/s through the model against what the GEMM peak would allow
    # (2 FLOPs per weight per token, embeddings excluded: they are a lookup)
    weights = sum(p.numel() for n, p in lm.model.named_parameters() if "embed" not in n)
    figures["eval_tokens_per_s_one_at_a_time"] = counter.n / sum(one)
    figures["tokens_per_s_at_matmul_peak"] = figures["matmul_peak_gflops"] * 1e9 / (2 * weights)

    if not args.skip_memit:
        memit = get_editor("memit")
        memit.apply(lm, reqs[:2]).restore()  # statistics cached
        e, t = timed(memit.apply, lm, reqs[: args.memit_batch])
        figures[f"memit_batch{args.memit_batch}_s"] = t
        figures[f"memit_batch{args.memit_batch}_s_per_edit"] = t / args.memit_batch
        figures["memit_mean_opt_steps"] = sum(e.info["steps"]) / len(e.info["steps"])
        e.restore()
        single = []
        for r in reqs[: args.rome_edits]:  # one fact per edit, as ROME's figure
            e, t = timed(memit.apply, lm, r)
            single.append(t)
            e.restore()
        figures["memit_median_s_per_edit"] = med(single)

    figures["rome_peak_rss_mb_fresh_process"] = rome_peak_memory(3)
    figures["this_process_peak_rss_mb"] = peak_rss_mb()
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in figures.items()}, indent=2))


if __name__ == "__main__":
    main()
