"""Causal tracing figures on SmolLM2-135M: seconds for one prompt (each kind), where its MLP effect
peaks, and the trace averaged over known facts (`known_1000.json`, facts the model gets right) with its
runtime per fact. Wall and CPU seconds are both printed: on a shared machine wall time depends on the
other load, CPU time much less.

    python benchmarks/bench_trace.py [--facts 40] [--samples 10] [--kinds hidden,mlp,attn] [--out DIR]
    python benchmarks/bench_trace.py --facts 0        # one prompt only
    python benchmarks/bench_trace.py --skip-prompt    # the averaged trace only
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import common  # noqa: F401  (puts src/ on the path, points EDITLAB_DATA at ../shared/data)


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _since(t: tuple[float, float]) -> tuple[float, float]:
    return time.perf_counter() - t[0], time.process_time() - t[1]


def _ie_row(tr, pos) -> str:
    return " ".join(f"{100 * float(x):+4.0f}" for x in tr.indirect_effect[pos])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="weights' dtype (bfloat16 runs about 3x faster than float32 on CPUs with AVX512-BF16)")
    ap.add_argument("--prompt", default="The Colosseum is located in the city of")
    ap.add_argument("--subject", default="Colosseum")
    ap.add_argument("--facts", type=int, default=40, help="known facts to average over (0: skip)")
    ap.add_argument("--samples", type=int, default=10)
    ap.add_argument("--kinds", default="hidden,mlp,attn")
    ap.add_argument("--scan", type=int, default=None, help="check only the first N facts of known_1000 (default: all)")
    ap.add_argument("--skip-prompt", action="store_true", help="only the averaged trace")
    ap.add_argument("--out", type=Path, default=Path("bench-trace"))
    args = ap.parse_args()

    import torch

    from editlab.models import load_lm
    from editlab.tracing import CausalTracer, UnknownFactError, average_traces, known_by_model, load_knowns, parse_kinds

    print(f"torch threads: {torch.get_num_threads()}")
    lm = load_lm(args.model, dtype=args.dtype)
    tracer = CausalTracer(lm, samples=args.samples)
    t = _clock()
    std = tracer.noise_std
    print(f"embedding std on the Wikipedia sample: {std:.4f} (noise std {3 * std:.4f}); measured in {_since(t)[0]:.1f} s")

    args.out.mkdir(parents=True, exist_ok=True)
    specs = parse_kinds(args.kinds, None, tracer.n_layers)
    total = _clock()
    for spec in [] if args.skip_prompt else specs:
        t = _clock()
        tr = tracer.trace(args.prompt, args.subject, kinds=[spec])[spec.label]
        wall, cpu = _since(t)
        tok, layer, ie = tr.peak()
        a, b = tr.subject_range
        print(f"\n[{spec.label}] {args.prompt!r} -> {tr.answer!r}: clean p {tr.high:.3f}, corrupted p {tr.low:.3f}; "
              f"{wall:.1f} s wall, {cpu:.1f} s CPU")
        print(f"  peak: token {tok} {tr.tokens[tok]!r}, layer {layer}, indirect effect {ie:+.3f}")
        last = tr.indirect_effect[b - 1]
        print(f"  last subject token {tr.tokens[b - 1]!r}: peak layer {int(last.argmax())}, {float(last.max()):+.3f}")
        for pos in range(a, len(tr.tokens)):
            print(f"  {tr.tokens[pos]!r:>14} {_ie_row(tr, pos)}")
        tr.save_png(args.out / f"one_{spec.label.replace(':', '_w')}.png")
    wall, cpu = _since(total)
    if not args.skip_prompt:
        print(f"\none prompt, kinds {args.kinds}: {wall:.1f} s wall, {cpu:.1f} s CPU")

    if args.facts <= 0:
        return
    t = _clock()
    facts = load_knowns()[: args.scan]
    known = known_by_model(lm, facts)
    print(f"\nknown_1000 (first {len(facts)}): the model's top-1 answer is right for {len(known)} of {len(facts)} facts "
          f"({100 * len(known) / len(facts):.1f} %), checked in {_since(t)[0]:.1f} s")
    chosen = known[: args.facts]
    # facts are traced one by one and the average is rewritten after each, so a run cut short still
    # leaves the figures for the facts done so far
    per_kind: dict[str, list] = {k.label: [] for k in specs}
    t = _clock()
    for i, f in enumerate(chosen, 1):
        try:
            res = tracer.trace(f.prompt, f.subject, f.answer, kinds=specs)
        except UnknownFactError as e:
            print(f"  skipped {f.prompt!r}: {e}")
            continue
        for label, tr in res.items():
            per_kind[label].append(tr)
        wall, cpu = _since(t)
        print(f"  {i}/{len(chosen)} {f.prompt!r} -> {f.answer!r}: {wall:.0f} s wall, {cpu:.0f} s CPU ({cpu / i:.0f} s CPU per fact)", flush=True)
        avgs = {label: average_traces(trs, wall) for label, trs in per_kind.items() if trs}
        (args.out / "average.json").write_text(json.dumps({k: v.to_dict() for k, v in avgs.items()}, indent=1))
        for label, avg in avgs.items():
            avg.save_png(args.out / f"average_{label.replace(':', '_w')}.png")
    wall, cpu = _since(t)
    n = len(next(iter(per_kind.values())))
    if not n:
        print("no fact could be traced")
        return
    print(f"\naveraged trace over {n} facts: {wall:.0f} s wall ({wall / n:.1f} s per fact), {cpu:.0f} s CPU "
          f"({cpu / n:.1f} s per fact); 200 facts would take about {200 * wall / n / 60:.0f} min wall, "
          f"{200 * cpu / n / 60:.0f} min CPU on this machine")
    for label, avg in avgs.items():
        cls, layer, ie = avg.peak()
        _, sl, sie = avg.peak("last subject token")
        print(f"\n[{label}] mean clean p {avg.high:.3f}, mean corrupted p {avg.low:.3f}; peak: {cls}, layer {layer}, {ie:+.3f}; "
              f"last subject token peak: layer {sl}, {sie:+.3f}")
        for c, row, cnt in zip(avg.classes, avg.effect, avg.counts):
            print(f"  {c:>24} ({cnt:3d}) " + " ".join(f"{100 * float(x):+4.0f}" for x in row))
    print(f"\nheatmaps in {args.out}/")


if __name__ == "__main__":
    main()
