"""Where a WISE sequence loses its edits (the router or the side memories), and what other thresholds do.

    python benchmarks/wise_routing.py --n 40 --skip 100 --save /tmp/wise40

Edits --n records of --data (default `counterfact-train`, the tuning split, records --skip ...) one after
another with the `smollm2-135m` WISE preset (or --set key=value), saves the sequence to --save (a later call
with the same --save reloads it instead of editing again), then scores every edit with all of them in
place under three routing rules. Routing happens at inference only (training never routes), so the
trained memories are the same for all three:

- `largest`: WISE-Retrieve's rule, as editlab implements it: at each token, of the memories whose
  activation Δ passes their threshold ε, the one with the largest Δ answers;
- `ratio`: the same, but the largest Δ/ε answers (a memory with a large delta cannot win by scale alone);
- `own`: each edit is scored with only the memory of its own shard (edit i belongs to shard i // save_freq;
  needs merge_freq 0): the router cannot pick a wrong memory, so what is still lost is lost inside the
  memory (later edits of the same shard overwriting it) or by its own threshold.

Prints one JSON line per rule: efficacy score, rewrite accuracy and locality accuracy over all edits.

With `--act-ratios 0.88,0.95` it instead rescores the saved sequence under WISE's routing (`largest`) with each
memory's threshold set to ratio × its smallest edit activation (routing only: the memories stay as
trained), adding rephrase accuracy and held-out locality on the locality prompts of `--heldout` records
of --data from index `--heldout-from` (after the edited ones, never trained against):

    python benchmarks/wise_routing.py --n 40 --skip 100 --save DIR --act-ratios 0.88,0.95,0.99 --heldout 60
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from common import emit_json_line  # noqa: F401  (common puts src/ on the path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--skip", type=int, default=100)
    ap.add_argument("--data", default="counterfact-train")
    ap.add_argument("--save", required=True, help="directory of the saved sequence (made on first use)")
    ap.add_argument("--set", action="append", default=[], help="WISE hparam override key=value")
    ap.add_argument("--out", default=None, help="JSON-lines file to append the results to")
    ap.add_argument("--act-ratios", default=None, help="rescore under these act_ratio values (comma-separated)")
    ap.add_argument("--heldout", type=int, default=60, help="with --act-ratios: records for held-out locality")
    ap.add_argument("--heldout-from", type=int, default=300, help="with --act-ratios: index of the first held-out record")
    args = ap.parse_args()
    try:
        ratios = [float(x) for x in args.act_ratios.split(",")] if args.act_ratios else []
    except ValueError:
        ap.error(f"--act-ratios takes comma-separated numbers, got {args.act_ratios!r}")
    if not all(0 < r <= 1 for r in ratios):
        ap.error("--act-ratios must lie in (0, 1]")
    if args.n < 1 or args.skip < 0:
        ap.error("--n must be >= 1 and --skip >= 0")

    import torch
    from tqdm import tqdm

    from editlab import get_editor, load_lm
    from editlab.data import load_requests
    from editlab.eval import evaluate_requests, pre_edit
    from editlab.methods import Edit
    from editlab.methods.adapters.wise import WISEWrapper

    lm = load_lm("smollm2-135m")
    reqs = load_requests(args.data, limit=args.skip + args.n)[args.skip:]
    ed = get_editor("wise")
    hp = ed.hparams(lm, **dict(s.split("=", 1) for s in args.set))
    if hp.merge_freq:
        ap.error("the `own` rule needs one memory per shard: run with merge_freq=0")
    pre = pre_edit(lm, reqs)
    if ratios:  # held-out records, scored on the unedited model before any edit is applied
        if args.heldout_from < args.skip + args.n:
            ap.error(f"--heldout-from {args.heldout_from} overlaps the edited records {args.skip}..{args.skip + args.n - 1}")
        held = load_requests(args.data, limit=args.heldout_from + args.heldout)[args.heldout_from:]
        pre_held = pre_edit(lm, held)
    save = Path(args.save)
    done = save / "complete"  # written last: a folder without it is an interrupted run, made again
    made = f"{len(reqs)} edits of {args.data}[{args.skip}:]\n"
    edit = None
    if done.exists():
        if done.read_text() != made:
            ap.error(f"{save} holds {done.read_text().strip()}, not {made.strip()}: give another --save")
        for i in range(len(reqs)):
            edit = Edit.load(save / f"{i:04d}", lm)
    else:
        for i, r in enumerate(tqdm(reqs, desc="wise edits", mininterval=10)):
            edit = ed.apply(lm, r, hp, on=edit)
            edit.save(save / f"{i:04d}")  # each edit of the sequence sits on the ones before it
        done.write_text(made)
    system = edit.lm
    # shards as the saved sequence made them (not this call's --set): edit i is in shard i // save_freq
    wrapper = next(m for m in lm.model.modules() if isinstance(m, WISEWrapper))
    if wrapper.merge_shards:
        ap.error(f"{save} was made with merge_freq: the `own` rule needs one memory per shard")
    save_freq = wrapper.save_freq or hp.save_freq

    def pick(self: WISEWrapper, x: torch.Tensor, normalise: bool):
        mem = self.memories(x.device)
        if mem is None:
            return None
        deltas, eps = mem
        side = torch.einsum("...i,soi->...so", x.float(), deltas)
        score = side.norm(dim=-1)
        fire = score > eps
        key = score / eps.clamp_min(1e-12) if normalise else score
        best = torch.where(fire, key, torch.full_like(key, -math.inf)).argmax(-1)
        chosen = torch.gather(side, -2, best[..., None, None].expand(*best.shape, 1, side.shape[-1]))[..., 0, :]
        return fire.any(-1), best, chosen

    def own(shard: int):
        def route(self: WISEWrapper, x: torch.Tensor):
            deltas, eps = self.memories(x.device)
            side = torch.einsum("...i,oi->...o", x.float(), deltas[shard])
            return side.norm(dim=-1) > eps[shard], torch.full(side.shape[:-1], shard), side
        return route

    def summary_of(rows, key: str) -> float:
        vals = [r[key] for r in rows if r.get(key) is not None]
        return round(sum(vals) / len(vals), 3)

    def summary(rows) -> dict[str, float]:
        return {key: summary_of(rows, key) for key in ("efficacy_score", "rewrite_acc", "locality_acc")}

    original = WISEWrapper.route
    common_fields = {"data": f"{args.data}[{args.skip}:{args.skip + len(reqs)}]", "edits": len(reqs),
                     "save_freq": save_freq}
    if ratios:
        act_min = wrapper.act_min.detach().clone()
        for ratio in ratios:
            with torch.no_grad():
                wrapper.threshold.copy_(ratio * act_min)
            wrapper._memories = None  # derived from the thresholds: rebuilt
            rows = evaluate_requests(system, reqs, pre)
            out = summary(rows)
            out["rephrase_acc"] = summary_of(rows, "rephrase_acc")
            out["heldout_locality_acc"] = summary_of(evaluate_requests(system, held, pre_held), "locality_acc")
            emit_json_line({"act_ratio": ratio, **common_fields, "heldout": f"{len(held)} records", **out}, args.out)
        return

    try:
        for rule, fn in (("largest", lambda self, x: pick(self, x, False)),
                         ("ratio", lambda self, x: pick(self, x, True))):
            WISEWrapper.route = fn
            emit_json_line({"rule": rule, **common_fields, **summary(evaluate_requests(system, reqs, pre))}, args.out)
        rows = []
        for i, r in enumerate(reqs):
            WISEWrapper.route = own(i // save_freq)
            rows += evaluate_requests(system, [r], pre)
        emit_json_line({"rule": "own", **common_fields, **summary(rows)}, args.out)
    finally:
        WISEWrapper.route = original


if __name__ == "__main__":
    main()
