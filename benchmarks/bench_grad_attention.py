"""Half precision on CPU: an edit's gradient passes with the math attention backend against PyTorch's default.

`LM.grad_attention = "math"` (the default) runs the attention of passes that keep gradients on the math
backend when the model is in bfloat16 or float16 on CPU; "default" leaves PyTorch's choice (the flash
kernel for CPU, whose backward is slow on an edit's short rows). For each of --n records of
`counterfact-train` (tuning records: nothing here is reported as a result) the method's edit is applied
in --dtype with both settings, alternating which goes first, and once in float32. Prints the median
seconds per edit of each setting, their ratio, the median distance of each setting's update to the
float32 update (relative to its norm; ROME and MEMIT write one weight delta per layer) and the edited
prompt's probability of the new target under each.

    OMP_NUM_THREADS=1 python benchmarks/bench_grad_attention.py [--method rome] [--n 6] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import math

from common import emit_json_line, med, timed  # noqa: F401  (common puts src/ on the path)


def _deltas(edit) -> list:
    import torch

    out = []
    for p in edit.patches:
        d = getattr(p, "delta", None)
        if d is not None:
            out.append(d.dense(torch.float32, "cpu") if hasattr(d, "dense") else d.float().cpu())
    return out


def _distance(a: list, b: list) -> float:
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b))
    den = sum(float(y.pow(2).sum()) for y in b)
    return math.sqrt(num / den) if den else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", default="rome")
    ap.add_argument("--n", type=int, default=6, help="records (counterfact-train, from --start)")
    ap.add_argument("--start", type=int, default=300)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--out", default=None, help="JSON-lines file to append the result to")
    args = ap.parse_args()
    if args.n < 1:
        ap.error("--n must be at least 1")

    from editlab import get_editor, load_lm
    from editlab.data import load_requests

    reqs = load_requests("counterfact-train", limit=args.start + args.n)[args.start:]
    editor = get_editor(args.method)
    f32 = load_lm("smollm2-135m")
    hp32 = editor.hparams(f32)
    editor.apply(f32, reqs[0], hp32).restore()  # statistics, templates and first passes, untimed
    ref = []
    for r in reqs:
        e = editor.apply(f32, r, hp32)
        ref.append(_deltas(e))
        e.restore()
    del f32
    lm = load_lm("smollm2-135m", dtype=args.dtype)
    hp = editor.hparams(lm)
    editor.apply(lm, reqs[0], hp).restore()
    times: dict[str, list[float]] = {"math": [], "default": []}
    dist: dict[str, list[float]] = {"math": [], "default": []}
    p_new: dict[str, list[float]] = {"math": [], "default": []}
    for i, r in enumerate(reqs):
        for setting in (("math", "default") if i % 2 else ("default", "math")):
            lm.grad_attention = setting
            edit, t = timed(editor.apply, lm, r, hp)
            times[setting].append(t)
            dist[setting].append(_distance(_deltas(edit), ref[i]))
            p_new[setting].append(math.exp(float(edit.lm.score([r.prompt], [r.target_new])[0].logprobs.sum())))
            edit.restore()
    lm.grad_attention = "math"
    emit_json_line({"method": args.method, "dtype": args.dtype, "records": f"counterfact-train[{args.start}:{args.start + args.n}]",
                    "s_per_edit_default": round(med(times["default"]), 2), "s_per_edit_math": round(med(times["math"]), 2),
                    "speedup": round(med(times["default"]) / med(times["math"]), 2),
                    "update_vs_float32_default": round(med(dist["default"]), 4),
                    "update_vs_float32_math": round(med(dist["math"]), 4),
                    "p_new_default": round(med(p_new["default"]), 3), "p_new_math": round(med(p_new["math"]), 3)}, args.out)


if __name__ == "__main__":
    main()
