"""Tune the SmolLM2-135M preset of KN on counterfact-train records only (never on records any reported
figure uses). Each record is edited alone, evaluated and restored, for every setting of a grid.

    python benchmarks/tune_kn.py --n 20 --cache ig.pt --grid "lambda_enhance=8" --grid "lambda_enhance=2;layers=10-29"

Settings are separated by repeated --grid, keys within one by ';' (`layers` takes a range a-b or a
comma list); --set applies to all. The integrated gradients of a record do not depend on lambdas,
threshold, sharing or which other layers are attributed (each layer is scaled on its own), so they are
computed once per record over every layer and sliced for each setting; seconds per edit are therefore
measured only where an attribution was computed (the first setting, or the up-front pass that fills
`--cache`, a file that keeps them for later runs on the same weights). Besides the CounterFact metrics,
`other_kept` is the fraction of the OTHER records' prompts and neighbourhood prompts whose top-1 next
token is unchanged by the edit: KN edits units that may fire on any text, and one neighbourhood prompt
per record sees little of that. One JSON line per setting is printed and appended to --out.
"""

from __future__ import annotations

import argparse
import time

from common import emit_json_line, med, timed

KEYS = ["efficacy_score", "paraphrase_score", "neighborhood_score", "efficacy_magnitude", "rewrite_acc",
        "rephrase_acc", "locality_acc"]


def parse_setting(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        k, v = part.split("=", 1)
        if k == "layers" and "-" in v and "," not in v:
            a, b = (int(x) for x in v.split("-"))
            v = ",".join(str(i) for i in range(a, b + 1))
        out[k.strip()] = v.strip()
    return out


def memoize_attribution(kn, n_layers: int, cache: dict) -> dict[str, int]:
    """Replace kn.integrated_gradients by a per-(prompts, targets, steps) cache over every layer."""
    real = kn.integrated_gradients
    stats = {"miss": 0}

    def cached(lm, prompt_ids, target_ids, layers, steps, batch_size=128):
        key = (tuple(tuple(p) for p in prompt_ids), tuple(target_ids), steps)
        if key not in cache:
            stats["miss"] += 1
            cache[key] = real(lm, prompt_ids, target_ids, list(range(n_layers)), steps, batch_size)
        full = cache[key]
        idx = list(layers)
        return kn.Attribution(idx, full.attr[:, idx], full.act[:, idx], full.prob)

    kn.integrated_gradients = cached
    return stats


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--offset", type=int, default=0, help="first counterfact-train record used")
    ap.add_argument("--grid", action="append", default=[], help="one setting: 'k=v;k=v' (repeatable)")
    ap.add_argument("--set", action="append", default=[], help="key=value override for every setting")
    ap.add_argument("--out", default=None, help="JSON-lines file to append results to")
    ap.add_argument("--cache", default=None, help="file keeping the attributions between runs (same model only)")
    args = ap.parse_args()

    import torch

    from editlab import get_editor, load_lm
    from editlab.data import load_requests
    from editlab.eval import evaluate_requests, pre_edit, summarize
    from editlab.methods.locate import kn

    lm = load_lm("smollm2-135m")
    reqs = load_requests("counterfact-train", limit=args.offset + args.n)[args.offset :]
    from pathlib import Path

    memo: dict = {}
    if args.cache and Path(args.cache).exists():
        saved = torch.load(args.cache)  # plain tensors and tuples only (weights_only loading)
        if saved["fingerprint"] == lm.fingerprint():
            memo = {key: kn.Attribution(list(range(lm.n_layers)), *tensors) for key, tensors in saved["attributions"]}
    stats = memoize_attribution(kn, lm.n_layers, memo)
    common = parse_setting(";".join(args.set))
    ed = get_editor("kn")
    pre = pre_edit(lm, reqs)
    unedited = summarize(evaluate_requests(lm, reqs, pre))
    others = [[p for q in reqs if q is not r for p in (q.prompt, *(n for n, _ in q.neighborhood))] for r in reqs]
    probes = sorted({p for ps in others for p in ps})
    top0 = dict(zip(probes, lm.next_token_logprobs(probes).argmax(-1).tolist()))
    uncached: list[float] = []  # seconds of the edits whose attribution was computed (not cached)
    if args.cache:
        # attribute every record once up front, so the cache is complete even if a setting fails
        for r in reqs:
            miss = stats["miss"]
            e, t = timed(ed.apply, lm, r, ed.hparams(lm, **common))
            e.restore()
            if stats["miss"] > miss:
                uncached.append(t)
        torch.save({"fingerprint": lm.fingerprint(),
                    "attributions": [(key, (a.attr, a.act, a.prob)) for key, a in memo.items()]}, args.cache)
    for setting in args.grid or [""]:
        hp = ed.hparams(lm, **{**common, **parse_setting(setting)})
        rows, kept, n_neurons, layers_hit = [], [], [], []
        t0 = time.perf_counter()
        for r, other in zip(reqs, others):
            miss = stats["miss"]
            e, t = timed(ed.apply, lm, r, hp)
            if stats["miss"] > miss:
                uncached.append(t)
            rows.extend(evaluate_requests(lm, [r], pre))
            with torch.no_grad():
                now = lm.next_token_logprobs(other).argmax(-1).tolist()
            kept.append(sum(int(a == top0[p]) for p, a in zip(other, now)) / len(other))
            n_neurons.append(len(e.info["neurons"]))
            layers_hit.extend(l for l, _ in e.info["neurons"])
            e.restore()
        s = summarize(rows)
        res = {
            "method": "kn",
            "records": f"counterfact-train[{args.offset}:{args.offset + args.n}]",
            "setting": {**common, **parse_setting(setting)},
            "edited": {k: round(s.get(k, float("nan")), 3) for k in KEYS} | {"other_kept": round(sum(kept) / len(kept), 3)},
            "unedited": {k: round(unedited.get(k, float("nan")), 3) for k in KEYS},
            "neurons_per_edit": round(sum(n_neurons) / len(n_neurons), 2),
            "neuron_layers": sorted(set(layers_hit)),
            "total_s": round(time.perf_counter() - t0, 1),
            "median_s_per_edit_uncached": round(med(uncached), 2) if uncached else None,
        }
        emit_json_line(res, args.out)


if __name__ == "__main__":
    main()
