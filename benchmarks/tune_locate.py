"""Tune the SmolLM2-135M presets of the locate-and-edit methods on counterfact-train records only (never
on records any reported figure uses), with and without the attention-sink prefix.

    python benchmarks/tune_locate.py --method rome --n 20 --sink on --set layer=6 --set v_weight_decay=0.5
    python benchmarks/tune_locate.py --method memit --n 30 --sink off --set layers=4,5,6,7,8
    python benchmarks/tune_locate.py --method alphaedit --mode sequential --n 20 --set null_space_energy=0.99

Modes: `single` (each record edited alone, evaluated, restored; the default for one-request methods),
`batch` (all records in one edit; the default for batch methods), `sequential` (one edit after the other,
each extending the previous with on= where the method supports it; everything evaluated at the end).
One JSON line per setting (hyper-parameters, sink, records used, summary metrics, unedited summary,
seconds) is printed and appended to --out.
"""

from __future__ import annotations

import argparse
import time

from common import emit_json_line, med, timed

KEYS = ["efficacy_score", "paraphrase_score", "neighborhood_score", "rewrite_acc", "rephrase_acc", "locality_acc"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--method", choices=["rome", "memit", "emmet", "pmet", "alphaedit"], required=True)
    ap.add_argument("--mode", choices=["single", "batch", "sequential"], default=None)
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--offset", type=int, default=0, help="first counterfact-train record used")
    ap.add_argument("--sink", choices=["on", "off", "arch"], default="arch",
                    help="force the <|endoftext|> sink prefix on/off, or keep the ArchSpec's choice")
    ap.add_argument("--set", action="append", default=[], help="key=value hyper-parameter override")
    ap.add_argument("--out", default=None, help="JSON-lines file to append the result to")
    args = ap.parse_args()

    from editlab import get_editor, load_lm
    from editlab.data import load_requests
    from editlab.eval import evaluate_requests, pre_edit, summarize

    lm = load_lm("smollm2-135m")
    if args.sink != "arch":
        # the LM encodes every prompt (methods, statistics, metrics) through lm.prefix_ids
        lm.prefix_ids = [lm.tokenizer.convert_tokens_to_ids("<|endoftext|>")] if args.sink == "on" else []
    reqs = load_requests("counterfact-train", limit=args.offset + args.n)[args.offset :]
    overrides = dict(s.split("=", 1) for s in args.set)
    ed = get_editor(args.method)
    hp = ed.hparams(lm, **overrides)
    pre = pre_edit(lm, reqs)
    unedited = summarize(evaluate_requests(lm, reqs, pre))
    t0 = time.perf_counter()
    mode = args.mode or ("batch" if ed.supports_batch else "single")
    if mode == "batch":
        e, t = timed(ed.apply, lm, reqs, hp)
        rows = evaluate_requests(lm, reqs, pre)
        e.restore()
        timing = {"batch_s": round(t, 1)}
    elif mode == "sequential":
        from editlab.methods import restore_all

        prev, times = None, []
        for r in reqs:
            prev, t = timed(ed.apply, lm, r, hp, on=prev if ed.supports_on else None)
            times.append(t)
        rows = evaluate_requests(lm, reqs, pre)
        restore_all(lm)
        timing = {"median_s_per_edit": round(med(times), 2)}
    else:
        rows, times = [], []
        for r in reqs:
            e, t = timed(ed.apply, lm, r, hp)
            times.append(t)
            rows.extend(evaluate_requests(lm, [r], pre))
            e.restore()
        timing = {"median_s_per_edit": round(med(times), 2)}
    res = {
        "method": args.method,
        "mode": mode,
        "sink": lm.prefix_ids,
        "records": f"counterfact-train[{args.offset}:{args.offset + args.n}]",
        "hparams": {k: v for k, v in hp.to_dict().items() if k not in ("corpus",)},
        "edited": {k: round(summarize(rows).get(k, float("nan")), 3) for k in KEYS},
        "unedited": {k: round(unedited.get(k, float("nan")), 3) for k in KEYS},
        "total_s": round(time.perf_counter() - t0, 1),
        **timing,
    }
    emit_json_line(res, args.out)


if __name__ == "__main__":
    main()
