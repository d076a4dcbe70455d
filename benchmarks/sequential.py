"""Sequential editing: how methods hold up as edits accumulate (the survey's point that ROME collapses
within tens of edits and MEMIT later, while methods that add parameters keep general ability flat).

    python benchmarks/sequential.py --methods grace,rome,memit --n 200 --checkpoints 10,50,100,200

Records: the first --n records of the shipped counterfact_portability_gpt4.json (never used for tuning),
or, for tuning, --data counterfact-train --skip K (records K ... K+n-1 of the training split).
Each method edits them one after the other; methods that can extend their previous edit (AlphaEdit's
protected keys, GRACE's codebook, the other adapters' tables) do so with on=. At every checkpoint it
prints, over ALL edits made so far:
- ES: efficacy (fraction with p(target_new) > p(target_true) on the edit prompt),
- retention: rewrite accuracy (teacher-forced token accuracy of target_new on the edit prompt),
- rephrase accuracy (paraphrase prompts) and locality accuracy (neighbourhood prompts keep their answer),
- perplexity on the first --ppl-tokens tokens of WikiText-2 test (shipped file), through edit.lm,
beside the unedited model's values on the same records, with the median seconds per edit and the
process's peak RSS. A PNG of retention, locality and perplexity against the edit count goes to --plot.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from common import ROOT, med, peak_rss_mb, timed  # noqa: F401  (common puts src/ on the path)

METRICS = {"es": "efficacy_score", "retention": "rewrite_acc", "rephrase": "rephrase_acc", "locality": "locality_acc"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--methods", default="alphaedit,memit,rome")
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--data", default="counterfact", help="dataset name (counterfact-train to tune)")
    ap.add_argument("--skip", type=int, default=0, help="leave out the first K records of --data")
    ap.add_argument("--checkpoints", default="10,50,100,200")
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--set", action="append", default=[], help="method:key=value override")
    ap.add_argument("--out", default=None, help="JSON-lines file to append results to")
    ap.add_argument("--plot", default=None, help="PNG path for the ES / perplexity curves")
    args = ap.parse_args()
    if args.skip < 0 or args.n < 1:
        ap.error("--skip must be >= 0 and --n >= 1")

    from tqdm import tqdm

    from editlab import get_editor, load_lm
    from editlab.data import load_requests
    from editlab.eval import evaluate_requests, pre_edit
    from editlab.eval.perplexity import perplexity, text_windows
    from editlab.methods import restore_all

    lm = load_lm("smollm2-135m")
    reqs = load_requests(args.data, limit=args.skip + args.n)[args.skip:]
    if not reqs:
        ap.error(f"--skip {args.skip} leaves no records of {args.data}")
    checkpoints = sorted({int(c) for c in args.checkpoints.split(",") if int(c) <= len(reqs)} | {len(reqs)})
    wiki = (Path(os.environ["EDITLAB_DATA"]) / "wikitext" / "wikitext-2-raw-test.txt").read_text()
    windows = text_windows(lm, wiki, n_tokens=args.ppl_tokens)
    pre = pre_edit(lm, reqs)

    def averages(rows) -> dict[str, float]:
        out = {}
        for name, key in METRICS.items():
            vals = [r[key] for r in rows if r.get(key) is not None]
            out[name] = round(sum(vals) / len(vals), 3) if vals else None
        return out

    def scores(system, upto: int) -> dict[str, float]:
        return averages(evaluate_requests(system, reqs[:upto], pre))

    base_rows = evaluate_requests(lm, reqs, pre)  # once: the unedited value at a checkpoint is a prefix mean
    base_scores = {c: averages(base_rows[:c]) for c in checkpoints}
    base = {"ppl": perplexity(lm, windows), "scores": base_scores}
    print(json.dumps({"method": "unedited", **base}), flush=True)
    curves: dict[str, list[tuple[int, dict[str, float], float]]] = {}
    for method in args.methods.split(","):
        ed = get_editor(method)
        overrides = dict(s.split(":", 1)[1].split("=", 1) for s in args.set if s.startswith(method + ":"))
        hp = ed.hparams(lm, **overrides)
        prev, times, curve = None, [], []
        t0 = time.perf_counter()
        for i, r in enumerate(tqdm(reqs, desc=f"{method} edits", mininterval=10), 1):
            prev, t = timed(ed.apply, lm, r, hp, on=prev if ed.supports_on else None)
            times.append(t)
            if i in checkpoints:
                system = prev.lm
                point = (i, scores(system, i), perplexity(system, windows))
                curve.append(point)
                line = {"method": method, "data": f"{args.data}[{args.skip}:{args.skip + len(reqs)}]", "edits": i, **point[1],
                        "unedited": base_scores[i], "ppl": round(point[2], 2),
                        "ppl_unedited": round(base["ppl"], 2), "median_s_per_edit": round(med(times), 2),
                        "elapsed_s": round(time.perf_counter() - t0, 1), "peak_rss_mb": round(peak_rss_mb())}
                print(json.dumps(line), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps({**line, "hparams": {k: v for k, v in hp.to_dict().items() if k != "corpus"}}) + "\n")
        restore_all(lm)
        curves[method] = curve
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (a, l, b) = plt.subplots(1, 3, figsize=(15, 4))
        for m, c in curves.items():
            a.plot([p[0] for p in c], [p[1]["retention"] for p in c], marker="o", label=m)
            l.plot([p[0] for p in c], [p[1]["locality"] for p in c], marker="o", label=m)
            b.plot([p[0] for p in c], [p[2] for p in c], marker="o", label=m)
        a.plot(checkpoints, [base_scores[c]["retention"] for c in checkpoints], "k--", label="unedited")
        l.plot(checkpoints, [base_scores[c]["locality"] for c in checkpoints], "k--", label="unedited")
        b.axhline(base["ppl"], color="k", linestyle="--", label="unedited")
        a.set(xlabel="edits so far", ylabel="rewrite accuracy of all edits so far", title="Retention")
        l.set(xlabel="edits so far", ylabel="neighbourhood token accuracy", title="Locality")
        b.set(xlabel="edits so far", ylabel="WikiText-2 perplexity", title="General ability", yscale="log")
        a.legend(), l.legend(), b.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
