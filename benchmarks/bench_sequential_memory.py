"""Peak memory and time of a long sequence of ROME edits on SmolLM2-135M (issue: 1,000 sequential edits
stay under 1.5 GB peak RSS). Each edit adds rank-one factors; the model keeps one copy of the edited
weight however many edits touch it. At the end the whole stack is restored and the weights are checked
bit for bit against the base fingerprint.

    python benchmarks/bench_sequential_memory.py [--n 1000] [--steps 20] [--data counterfact-train]

`--steps` and `--templates` cap ROME's value-optimisation steps and context templates (default: the
preset's) to fit a long sequence into a CPU budget; memory does not depend on them.
"""

from __future__ import annotations

import argparse
import time

from common import med, peak_rss_mb


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=None, help="cap on ROME's v_steps")
    ap.add_argument("--templates", default=None, help="cap on ROME's context templates, e.g. [[5,2]]")
    ap.add_argument("--data", default="counterfact-train")
    ap.add_argument("--every", type=int, default=100, help="print a progress line every N edits")
    args = ap.parse_args()

    from editlab import get_editor, load_lm
    from editlab.data import load_requests
    from editlab.memory import release_freed_memory
    from editlab.methods import restore_all
    from editlab.methods.patches import WeightLedger

    lm = load_lm("smollm2-135m")
    reqs = load_requests(args.data, limit=args.n)
    editor = get_editor("rome")
    over: dict = {"v_steps": args.steps} if args.steps else {}
    if args.templates:
        over["context_templates"] = args.templates
    hp = editor.hparams(lm, **over)
    editor.apply(lm, reqs[0], hp).restore()  # statistics and templates computed before timing
    rss0 = peak_rss_mb()
    times = []
    t_all = time.perf_counter()
    for i, r in enumerate(reqs, 1):
        t = time.perf_counter()
        editor.apply(lm, r, hp)
        times.append(time.perf_counter() - t)
        release_freed_memory()  # as the sequential runner does after each edit
        if i % args.every == 0 or i == len(reqs):
            led = WeightLedger.of(lm)
            print(f"{i:5d} edits  peak RSS {peak_rss_mb():7.0f} MB  kept originals {led.nbytes() / 2**20:.1f} MB  "
                  f"median {med(times):.2f} s/edit", flush=True)
    total = time.perf_counter() - t_all
    t = time.perf_counter()
    restore_all(lm)
    t_restore = time.perf_counter() - t
    same = lm.fingerprint() == lm.base_fingerprint
    hd = hp.to_dict()
    print(f"\nsequential ROME, {len(reqs)} edits on smollm2-135m (v_steps={hd.get('v_steps')}, "
          f"templates={hd.get('context_templates')}):")
    print(f"  peak RSS {peak_rss_mb():.0f} MB (after load and first edit: {rss0:.0f} MB)")
    print(f"  {total:.0f} s in all, median {med(times):.2f} s/edit")
    print(f"  restore_all {t_restore:.2f} s, weights bit-identical to base: {same}")


if __name__ == "__main__":
    main()
