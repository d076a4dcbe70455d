"""Quality on the first N records of counterfact_portability_gpt4.json with SmolLM2-135M:
single edits (edit, evaluate, restore) for ROME / FT-L / FT-M / KN, MEMIT / EMMET / PMET / AlphaEdit with
all N edits in one batch, and, for `--sequential-methods`, all N edits made one after another (extending the
previous edit with on= where the method can: SERAC's and IKE's memory of N facts) and evaluated together.
Every metric is printed beside the unedited model's value on the same records. The presets were tuned
on `counterfact-train` records, disjoint from these.

    python benchmarks/quality_counterfact.py [--n 200] [--n-ft 50] [--methods rome,memit,ft,ft-m] [--out results.json]
"""

from __future__ import annotations

import argparse
import json

from common import med, peak_rss_mb, timed

KEYS = ["efficacy_score", "paraphrase_score", "neighborhood_score", "cf_score", "efficacy_magnitude",
        "paraphrase_magnitude", "neighborhood_magnitude", "rewrite_acc", "rephrase_acc", "locality_acc", "portability_acc"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--start", type=int, default=0, help="skip this many records first (e.g. 200: records 200 to 200+n)")
    ap.add_argument("--n-ft", type=int, default=50, help="records for the (slow) fine-tuning baselines")
    ap.add_argument("--methods", default="rome,memit,ft,ft-m")
    ap.add_argument("--batch-methods", default="memit,emmet,pmet,alphaedit",
                    help="methods that edit all records in one batch (the others edit one record at a time)")
    ap.add_argument("--sequential-methods", default="",
                    help="methods that edit the records one after another and are evaluated with all N edits in place "
                         "(reported as METHOD+seq)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--set", action="append", default=[], help="method.key=value hparam override")
    args = ap.parse_args()
    if args.start < 0 or args.n < 1:
        ap.error("--start must be at least 0 and --n at least 1")

    from tqdm import tqdm

    from editlab import get_editor, load_lm
    from editlab.data import load_requests
    from editlab.eval import evaluate_requests, pre_edit, summarize
    from editlab.methods import restore_all

    overrides: dict[str, dict[str, str]] = {}
    for s in args.set:
        mk, v = s.split("=", 1)
        m, k = mk.split(".", 1)
        overrides.setdefault(m, {})[k] = v

    lm = load_lm("smollm2-135m")
    reqs = load_requests("counterfact", limit=args.start + args.n)[args.start :]
    pre = pre_edit(lm, reqs)
    unedited_rows = evaluate_requests(lm, reqs, pre)
    results = {"unedited": summarize(unedited_rows)}
    per_record = {"unedited": unedited_rows}  # kept so any subset (e.g. the first 30) can be summarised later
    timing = {}
    sequential = [m for m in args.sequential_methods.split(",") if m]
    single = [m for m in args.methods.split(",") if m]  # --methods "" runs only the sequential ones
    for method in single + [m + "+seq" for m in sequential]:
        if method.endswith("+seq"):
            name = method.removesuffix("+seq")
            ed = get_editor(name)
            hp = ed.hparams(lm, **overrides.get(name, {}))
            top, times = None, []
            for r in tqdm(reqs, desc=method):
                top, t = timed(ed.apply, lm, r, hp, on=top if ed.supports_on else None)
                times.append(t)
            rows = evaluate_requests(top.lm, reqs, pre)
            restore_all(lm)
            timing[method] = {"median_s_per_edit": med(times)}
            results[method], per_record[method] = summarize(rows), rows
            timing[method]["peak_rss_mb"] = round(peak_rss_mb())
            print(method, {k: round(results[method].get(k, float("nan")), 3) for k in KEYS}, timing[method], flush=True)
            continue
        ed = get_editor(method)
        hp = ed.hparams(lm, **overrides.get(method, {}))
        subset = reqs[: args.n_ft] if method.startswith("ft") else reqs
        if method in args.batch_methods.split(","):
            e, t = timed(ed.apply, lm, subset, hp)
            rows = evaluate_requests(e.lm, subset, pre)
            e.restore()
            timing[method] = {"batch_s": t}
        else:
            rows, times = [], []
            for r in tqdm(subset, desc=method):
                e, t = timed(ed.apply, lm, r, hp)
                times.append(t)
                rows.extend(evaluate_requests(e.lm, [r], pre))
                e.restore()
            timing[method] = {"median_s_per_edit": med(times)}
        if len(subset) != len(reqs):
            results[f"unedited (first {len(subset)})"] = summarize(evaluate_requests(lm, subset, pre))
        results[method] = summarize(rows)
        per_record[method] = rows
        timing[method]["peak_rss_mb"] = round(peak_rss_mb())
        print(method, {k: round(results[method].get(k, float("nan")), 3) for k in KEYS}, timing[method], flush=True)
    print()
    print("| method | " + " | ".join(KEYS) + " |")
    print("|---|" + "---|" * len(KEYS))
    for m, s in results.items():
        print(f"| {m} | " + " | ".join(f"{s.get(k, float('nan')):.3f}" for k in KEYS) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"n": args.n, "start": args.start, "results": results, "timing": timing, "rows": per_record,
                       "hparams": {m: get_editor(m).hparams(lm, **overrides.get(m, {})).to_dict()
                                   for m in dict.fromkeys(single + sequential)}}, f, indent=2)


if __name__ == "__main__":
    main()
