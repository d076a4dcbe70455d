"""Does causal tracing say where to edit? ROME at each of a sweep of layers against the MLP causal trace
of the same records (Hase et al. 2023 asked this of GPT-J and found almost no relation).

For the first `--n` CounterFact records whose true answer SmolLM2 gives at least 5 % (`--min-prob`: so
there is a recall to trace): the MLP trace (10-layer windows, 10 noise samples, 3x noise) of the true fact, and
ROME edits at every `--layers` layer (each edited alone, scored, restored). Prints per layer the mean
indirect effect at the last subject token and the edit scores; the layer each picks; and the Pearson
correlation, over (record, layer) pairs, between the traced effect and the edit's success (efficacy
and paraphrase magnitude: mean p(new) - p(true)). One JSON line per (record, layer) goes to --out.

    python benchmarks/layer_agreement.py [--n 10] [--layers 0,3,6,...,27] [--scan 500] [--stats-tokens N] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import time

from common import emit_json_line, med

KEYS = ["efficacy_magnitude", "paraphrase_magnitude", "efficacy_score", "paraphrase_score", "neighborhood_score"]


def pearson(xs: list[float], ys: list[float]) -> float:
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10, help="records traced and edited")
    ap.add_argument("--scan", type=int, default=500, help="CounterFact records looked at to find them")
    ap.add_argument("--layers", default=",".join(str(i) for i in range(0, 30, 3)))
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--min-prob", type=float, default=0.05,
                    help="clean p(true answer) a record needs to be traced (a barely known fact has little to restore)")
    ap.add_argument("--out", default=None, help="JSON-lines file for the (record, layer) rows")
    ap.add_argument("--stats-tokens", type=int, default=None,
                    help="covariance tokens for every layer of the sweep (default: the preset's; fewer make the "
                         "statistics of many new layers affordable, the same for all layers)")
    args = ap.parse_args()

    from editlab import get_editor, load_lm
    from editlab.data import load_requests
    from editlab.eval import evaluate_requests, pre_edit
    from editlab.stats import warm_statistics
    from editlab.tracing import CausalTracer, UnknownFactError

    lm = load_lm("smollm2-135m")
    layers = [int(x) for x in args.layers.split(",")]
    tracer = CausalTracer(lm, samples=args.samples, min_prob=args.min_prob)
    chosen, effects = [], []
    t0 = time.perf_counter()
    for req in load_requests("counterfact", limit=args.scan):
        try:
            tr = tracer.trace(req.prompt, req.subject, req.target_true, kinds="mlp")
        except UnknownFactError:
            continue
        res = next(iter(tr.values()))
        last = res.subject_range[1] - 1
        chosen.append(req)
        effects.append(res.indirect_effect[last].tolist())
        print(f"traced {len(chosen)}/{args.n}: {req.prompt!r} -> {req.target_true!r} (p {res.high:.3f}), "
              f"MLP peak at layer {max(range(len(effects[-1])), key=effects[-1].__getitem__)}", flush=True)
        if len(chosen) == args.n:
            break
    trace_s = time.perf_counter() - t0
    ed = get_editor("rome")
    stats = {} if args.stats_tokens is None else {"mom2_n_tokens": args.stats_tokens}
    hps = {layer: ed.hparams(lm, layer=layer, **stats) for layer in layers}
    warm_statistics(lm, hps.values())
    pre = pre_edit(lm, chosen)
    rows, times = [], []
    for layer in layers:
        for i, req in enumerate(chosen):
            t = time.perf_counter()
            edit = ed.apply(lm, req, hps[layer])
            times.append(time.perf_counter() - t)
            m = evaluate_requests(lm, [req], pre)[0]
            edit.restore()
            row = {"record": req.case_id, "layer": layer,
                   "trace_effect": effects[i][layer], **{k: m.get(k) for k in KEYS}}
            rows.append(row)
            if args.out:
                with open(args.out, "a") as f:
                    f.write(json.dumps(row) + "\n")
        print(f"layer {layer}: " + ", ".join(f"{k} {sum(r[k] for r in rows if r['layer'] == layer) / len(chosen):.3f}"
                                           for k in ["trace_effect", *KEYS]), flush=True)
    mean = {layer: {k: sum(r[k] for r in rows if r["layer"] == layer) / len(chosen) for k in ["trace_effect", *KEYS]}
            for layer in layers}
    pick = {k: max(layers, key=lambda l: mean[l][k]) for k in ["trace_effect", *KEYS]}
    corr = {k: pearson([r["trace_effect"] for r in rows], [r[k] for r in rows]) for k in KEYS}
    per_record = []  # rows are layer-major: rows[j * n + i] is record i at layers[j]
    for i in range(len(chosen)):
        mine = rows[i::len(chosen)]
        peak = max(layers, key=lambda l: effects[i][l])
        best = max(mine, key=lambda r: r["efficacy_magnitude"])["layer"]
        per_record.append({"trace_peak": peak, "best_efficacy_layer": best})
    emit_json_line({"records": len(chosen), "layers": layers, "stats_tokens": hps[layers[0]].mom2_n_tokens, "layer_picked_by": pick,
                    "pearson_trace_vs": {k: round(v, 3) for k, v in corr.items()},
                    "per_record": per_record, "trace_s": round(trace_s, 1),
                    "median_s_per_edit": round(med(times), 2)})


if __name__ == "__main__":
    main()
