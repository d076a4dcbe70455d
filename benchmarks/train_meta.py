"""Train a meta-learned editor (MEND, MALMEN, KE) on SmolLM2-135M and time it, then time its edits.

Training data: `counterfact-train` (its last `val_records` records are the validation split that early
stopping reads); nothing here touches an evaluation split. The trained editor lands in the user cache,
where `editlab eval --method M` and benchmarks/quality_counterfact.py find it.

    python benchmarks/train_meta.py --method mend [--limit 4000] [--set steps=800] [--force]
"""

from __future__ import annotations

import argparse
import json

from common import med, peak_rss_mb, timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", default="mend")
    ap.add_argument("--data", default="counterfact-train")
    ap.add_argument("--limit", type=int, default=None, help="training records (default: all)")
    ap.add_argument("--set", action="append", default=[], help="key=value hparam override")
    ap.add_argument("--force", action="store_true", help="train again over a cached checkpoint")
    ap.add_argument("--apply-n", type=int, default=10, help="edits timed after training (counterfact-val records)")
    args = ap.parse_args()

    from editlab import get_editor, load_lm
    from editlab.data import load_requests

    lm = load_lm("smollm2-135m")
    editor = get_editor(args.method)
    overrides = dict(kv.split("=", 1) for kv in args.set)
    hp = editor.hparams(lm, **overrides)
    reqs = load_requests(args.data, limit=args.limit)
    print(f"{args.method}: {len(reqs)} training records from {args.data}; hparams {hp.to_dict()}", flush=True)
    ckpt, seconds = timed(editor.fit, lm, reqs, hp, force=args.force)
    meta = ckpt.meta
    print(json.dumps({"method": args.method, "train_seconds_this_call": round(seconds, 1),
                      "train_seconds": meta.get("seconds"), "steps": meta.get("steps"),
                      "stopped_early": meta.get("stopped_early"), "best_val_loss": meta.get("best_val_loss"),
                      "checkpoint": str(ckpt.path), "peak_rss_mb": round(peak_rss_mb())}), flush=True)
    for row in meta.get("history", []):
        print(json.dumps(row), flush=True)
    times = []
    for r in load_requests("counterfact-val", limit=args.apply_n):
        edit, t = timed(editor.apply, lm, r, hp)
        times.append(t)
        edit.restore()
    print(json.dumps({"method": args.method, "apply_median_s": round(med(times), 3),
                      "apply_max_s": round(max(times), 3), "n": len(times)}), flush=True)


if __name__ == "__main__":
    main()
