"""Cost of one checkpoint's probes on SmolLM2 (issue target: every probe at quick sizes in <= 90 s).

    python benchmarks/bench_probes.py [--probes perplexity,downstream,nkl,norm] [--budget quick] [--repeats 2]
    python benchmarks/bench_probes.py --method ike --probes perplexity [--no-shared-prefix]
    python benchmarks/bench_probes.py --method ike --edits 100 --probes downstream --repeats 1

Measures the probes at an edited checkpoint's cost: the system measured is a pass-through view of the
unedited model, so no probe can answer from what it computed in its one-off preparation (which is
timed apart, and which is what checkpoint 0 costs). With `--method M` it is instead the system of one
edit by M (the first CounterFact record, M's SmolLM2 preset; `--edits N`: the first N records, as one
batch where M edits batches, else one after the other): an LM view such as IKE's reads every probe prompt and
window after its context, and with many facts each prompt after its own. `--no-shared-prefix` turns off the LM's shared-prefix KV cache
(`min_shared_prefix = 0`), to measure what it saves. Prints wall and CPU seconds per probe
and in total, median over --repeats, with torch's thread count: run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import common  # noqa: F401  (puts src/ on the path, points EDITLAB_DATA at ../shared/data)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="weights' dtype (bfloat16 runs about 3x faster than float32 on CPUs with AVX512-BF16)")
    ap.add_argument("--probes", default="perplexity,downstream,nkl,norm")
    ap.add_argument("--budget", default="quick")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--method", default="", help="measure the system of one edit by this method")
    ap.add_argument("--edits", type=int, default=1, help="with --method: edit the first N CounterFact records")
    ap.add_argument("--no-shared-prefix", action="store_true", help="run every shared context in full")
    args = ap.parse_args()
    if args.edits < 1:
        ap.error(f"--edits must be at least 1, got {args.edits}")
    if args.edits > 1 and not args.method:
        ap.error("--edits needs --method (the pass-through view makes no edit)")

    import torch

    from editlab.models import load_lm
    from editlab.models.view import LMView
    from editlab.probes import get_probes, parse_probes

    probes = get_probes(parse_probes(args.probes), args.budget)
    lm = load_lm(args.model, dtype=args.dtype)
    if args.no_shared_prefix:
        lm.min_shared_prefix = 0
    print(f"torch threads: {torch.get_num_threads()}, budget {args.budget}, "
          f"shared prefixes from {lm.min_shared_prefix} tokens (0 = off), system: {args.method or 'pass-through view'}")
    system = LMView(lm)
    if args.method:
        from editlab.data import load_requests
        from editlab.methods import get_editor

        t = time.perf_counter()
        editor = get_editor(args.method)
        requests = load_requests("counterfact", limit=args.edits)
        if editor.supports_batch or len(requests) == 1:
            edit = editor.apply(lm, requests)
        else:
            edit = None
            for r in requests:  # one after the other: extending the memory, or stacked on the weights
                edit = editor.apply(lm, [r], on=edit if editor.supports_on else None)
        system = edit.lm
        print(f"{args.method}: {len(requests)} edit(s) in {time.perf_counter() - t:.1f} s")
    totals_wall, totals_cpu = [], []
    for p in probes:
        t, c = time.perf_counter(), time.process_time()
        p.prepare(lm)
        print(f"{p.name}: prepared in {time.perf_counter() - t:.1f} s wall, {time.process_time() - c:.1f} s CPU")
    per: dict[str, list[tuple[float, float]]] = {p.name: [] for p in probes}
    values: dict[str, dict[str, float]] = {}
    for _ in range(args.repeats):
        wall = cpu = 0.0
        for p in probes:
            t, c = time.perf_counter(), time.process_time()
            values[p.name] = p.measure(system, lm)
            w, u = time.perf_counter() - t, time.process_time() - c
            per[p.name].append((w, u))
            wall, cpu = wall + w, cpu + u
        totals_wall.append(wall)
        totals_cpu.append(cpu)
    for name, runs in per.items():
        print(f"{name}: median {statistics.median(w for w, _ in runs):.1f} s wall, "
              f"{statistics.median(u for _, u in runs):.1f} s CPU; values {json.dumps(values[name])[:300]}")
    print(f"all probes, one checkpoint: median {statistics.median(totals_wall):.1f} s wall, "
          f"{statistics.median(totals_cpu):.1f} s CPU over {args.repeats} repeats")


if __name__ == "__main__":
    main()
