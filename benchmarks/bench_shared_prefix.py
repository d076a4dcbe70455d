"""What running a shared prefix once saves: an IKE edit's evaluation, scored with and without it.

IKE puts the same ~1,000-token context (32 demonstrations and the new fact) before every probe of a
record, so every probe's sequence starts with it. `LM.min_shared_prefix` (default 128) makes scoring run
that prefix once and only each probe's own tokens after its KV cache; 0 runs every sequence in full (the
behaviour before). For each of the first --n records of the shipped portability file (evaluation
records; nothing here is tuned) the IKE edit is applied once and `evaluate_requests` is timed both ways,
alternating which goes first; it prints the median seconds per record for each, their ratio, and the
largest difference between the two runs' metric values (float noise of a different batch layout).

    OMP_NUM_THREADS=1 python benchmarks/bench_shared_prefix.py [--n 3] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse

from common import emit_json_line, med, timed  # noqa: F401  (common puts src/ on the path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3, help="records (each is evaluated twice)")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--out", default=None, help="JSON-lines file to append the result to")
    args = ap.parse_args()
    if args.n < 1:
        ap.error("--n must be at least 1")

    from editlab import get_editor, load_lm
    from editlab.data import load_requests
    from editlab.eval import evaluate_requests, pre_edit

    lm = load_lm("smollm2-135m", dtype=args.dtype)
    reqs = load_requests("counterfact", limit=args.n)
    pre = pre_edit(lm, reqs)
    ike = get_editor("ike")
    hp = ike.hparams(lm)
    default = lm.min_shared_prefix
    times: dict[int, list[float]] = {0: [], default: []}
    worst, tokens = 0.0, []
    for i, r in enumerate(reqs):
        edit = ike.apply(lm, r, hp)
        tokens.append(len(lm.encode_prompt(edit.lm.wrap([r.prompt], [0])[0])))
        if i == 0:  # the once-per-LM check of the shared-prefix path runs here, untimed
            evaluate_requests(edit.lm, [r], pre)
        rows = {}
        for setting in ((0, default) if i % 2 else (default, 0)):
            lm.min_shared_prefix = setting
            rows[setting], t = timed(evaluate_requests, edit.lm, [r], pre)
            times[setting].append(t)
        lm.min_shared_prefix = default
        edit.restore()
        a, b = rows[0][0], rows[default][0]
        worst = max([worst] + [abs(a[k] - b[k]) for k in a if isinstance(a[k], float) and isinstance(b.get(k), float)])
    full, shared = med(times[0]), med(times[default])
    emit_json_line({"records": len(reqs), "dtype": str(lm.dtype), "context_tokens_median": med(tokens),
                    "s_per_record_full": round(full, 2), "s_per_record_shared_prefix": round(shared, 2),
                    "speedup": round(full / shared, 1), "max_metric_difference": worst,
                    "shared_prefix_check": lm.cache.get("lm.shared_prefix_exact")}, args.out)


if __name__ == "__main__":
    main()
