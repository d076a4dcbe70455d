"""GRACE over a long sequence: time per edit as the codebook grows (it should stay flat: only the lookup,
one distance computation against all keys per token, grows with it), the codebook's size in memory and
the process's peak RSS, and retention of the first edits at the end.

    python benchmarks/bench_grace_scaling.py [--n 1000] [--every 100]

Records: counterfact-train (timing and memory only; these records are the tuning split, so the retention
printed here is a sanity check, not a result). Each edit extends the previous one (on=), as the runner's
sequential mode does.
"""

from __future__ import annotations

import argparse
import time

from common import emit_json_line, med, peak_rss_mb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    from editlab import get_editor, load_lm
    from editlab.data import load_requests

    lm = load_lm("smollm2-135m")
    reqs = load_requests("counterfact-train", limit=args.n)
    ed = get_editor("grace")
    hp = ed.hparams(lm)
    prev, times, steps, lookup = None, [], [], []
    probe = [r.prompt for r in reqs[:50]]
    for i, r in enumerate(reqs, 1):
        t = time.perf_counter()
        prev = ed.apply(lm, r, hp, on=prev)
        times.append(time.perf_counter() - t)
        steps.append(prev.info["steps"])
        if i % args.every == 0 or i == len(reqs):
            book = lm.model.get_submodule(prev.info["path"])
            t = time.perf_counter()
            prev.lm.next_token_logprobs(probe)
            lookup.append(time.perf_counter() - t)
            window = times[-args.every:]
            emit_json_line({"edits": i, "codebook_rows": book.n_rows,
                            "median_s_per_edit_last_window": round(med(window), 3),
                            "median_adam_steps_last_window": med(steps[-args.every:]),
                            "s_next_token_50_prompts": round(lookup[-1], 3),
                            "codebook_mb": round(sum(t.numel() * t.element_size() for t in book.buffers()) / 2**20, 2),
                            "peak_rss_mb": round(peak_rss_mb())}, args.out)
    first = reqs[: args.every]
    scores = prev.lm.score([r.prompt for r in first], [r.target_new for r in first])
    kept = sum(s.argmax_ids == s.target_ids for s in scores) / len(first)
    emit_json_line({"retention_of_first_edits": round(kept, 3), "first": len(first), "after": len(reqs)}, args.out)


if __name__ == "__main__":
    main()
