"""Peak memory of one batch edit of a locate-and-edit method on SmolLM2-135M (statistics cached), in a
fresh process so that nothing else counts: the value optimisation's chunks and prefix-cache budget are
what bound it. The number of optimisation steps does not change the memory, so `--steps 2` measures
the peak of a full edit in a fraction of its time (the edit itself is then not converged).

    python benchmarks/bench_batch_memory.py --method memit --n 100 [--steps 2] [--set v_cache_mb=1024]
"""

from __future__ import annotations

import argparse
import time

from common import emit_json_line, peak_rss_mb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="memit")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="key=value hyper-parameter override")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from editlab import get_editor, load_lm
    from editlab.data import load_requests

    lm = load_lm("smollm2-135m")
    loaded = peak_rss_mb()
    reqs = load_requests("counterfact", limit=args.n)
    ed = get_editor(args.method)
    hp = ed.hparams(lm, v_steps=args.steps, **dict(s.split("=", 1) for s in args.set))
    ed.apply(lm, reqs[:1], hp).restore()  # statistics loaded (or computed) and cached first
    t = time.perf_counter()
    e = ed.apply(lm, reqs, hp)
    seconds = time.perf_counter() - t
    e.restore()
    emit_json_line({"method": args.method, "n": args.n, "v_steps": args.steps,
                    "overrides": args.set, "seconds": round(seconds, 1),
                    "peak_rss_mb_after_load": round(loaded), "peak_rss_mb": round(peak_rss_mb())}, args.out)


if __name__ == "__main__":
    main()
