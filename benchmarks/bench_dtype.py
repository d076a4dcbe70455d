"""float32 against bfloat16 on the same records: edit quality and time per edit of one method, and the
forward-pass throughput of the model, so a user can decide whether the faster dtype is good enough.

    python benchmarks/bench_dtype.py [--method rome] [--data counterfact-train] [--skip 300] [--n 10]

Each record is edited alone (single edits, restored after) in each dtype; prints efficacy, paraphrase
and neighbourhood scores with the unedited model's values, the median seconds per edit, and tokens/s
of a 50 x 10-token forward pass of the backbone (without the LM head). Defaults use tuning records (counterfact-train), as this is a
precision comparison, not a reported result. Statistics are computed per dtype (the cache keys them
by the weights) and timed apart.
"""

from __future__ import annotations

import argparse
import statistics
import time

import common  # noqa: F401  (puts src/ on the path, points EDITLAB_DATA at ../shared/data)

METRICS = ("efficacy_score", "paraphrase_score", "neighborhood_score", "rewrite_acc")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="rome")
    ap.add_argument("--data", default="counterfact-train")
    ap.add_argument("--skip", type=int, default=300)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()

    import torch

    from editlab import get_editor, load_lm
    from editlab.data import load_requests
    from editlab.eval import evaluate_requests, pre_edit
    from editlab.stats import warm_statistics

    reqs = load_requests(args.data, limit=args.skip + args.n)[args.skip:]
    print(f"torch threads: {torch.get_num_threads()}; {args.method} on {args.data}[{args.skip}:{args.skip + len(reqs)}], single edits")
    for dtype in args.dtypes.split(","):
        lm = load_lm(args.model, dtype=dtype)
        ids = torch.randint(0, min(1000, len(lm.tokenizer)), (50, 10))
        with torch.no_grad():
            lm.backbone_forward(ids, torch.ones_like(ids))
            t = time.perf_counter()
            for _ in range(3):
                lm.backbone_forward(ids, torch.ones_like(ids))
        tps = 3 * ids.numel() / (time.perf_counter() - t)
        ed = get_editor(args.method)
        hp = ed.hparams(lm)
        t = time.perf_counter()
        warm_statistics(lm, [hp])
        stats_s = time.perf_counter() - t
        pre = pre_edit(lm, reqs)
        base = evaluate_requests(lm, reqs, pre)
        rows, times = [], []
        for r in reqs:
            t = time.perf_counter()
            edit = ed.apply(lm, r, hp)
            times.append(time.perf_counter() - t)
            rows += evaluate_requests(edit.lm, [r], pre)
            edit.restore()

        def mean(rs, k):
            vals = [x[k] for x in rs if x.get(k) is not None]
            return sum(vals) / len(vals) if vals else float("nan")

        scores = ", ".join(f"{k} {mean(rows, k):.3f} ({mean(base, k):.3f})" for k in METRICS)
        print(f"{dtype}: backbone forward {tps:.0f} tokens/s; statistics {stats_s:.1f} s; median {statistics.median(times):.2f} s "
              f"per edit; edited (unedited): {scores}", flush=True)


if __name__ == "__main__":
    main()
