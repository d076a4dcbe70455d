"""Where a GRACE-style radius should sit for a model and layer: distances between the key of an edit
prompt (the wrapped module's input at its last token) and the inputs that module sees on
- the same fact asked another way (paraphrases: should fall INSIDE the radius),
- every token of the neighbourhood prompts (other subjects, same relation: should fall OUTSIDE),
- every token of unrelated text (WikiText-2 test: should fall OUTSIDE),
each as a fraction of the key's own norm (GRACE's `eps_unit="key_norm"`) and in raw L2 units.

Records: counterfact-train (the tuning split; never reported as results).

    python benchmarks/calibrate_radius.py [--n 100] [--layer 25] [--module mlp_out] [--wiki-tokens 20000]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from common import ROOT  # noqa: F401  (puts src/ on the path)


def quantiles(x, qs=(0.05, 0.1, 0.25, 0.5, 0.75, 0.9)):
    import torch

    t = torch.as_tensor(x, dtype=torch.float64)
    return {f"p{int(q * 100)}": round(float(torch.quantile(t, q)), 3) for q in qs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--layer", type=int, default=25)
    ap.add_argument("--module", default="mlp_out", choices=["mlp_out", "mlp_in"])
    ap.add_argument("--wiki-tokens", type=int, default=20000)
    args = ap.parse_args()

    import torch

    from editlab import load_lm
    from editlab.data import load_requests
    from editlab.methods.adapters.queries import last_prompt_inputs, token_inputs

    lm = load_lm("smollm2-135m")
    path = lm.arch.mlp_out_path(args.layer) if args.module == "mlp_out" else lm.arch.mlp_in_path(args.layer)
    reqs = load_requests("counterfact-train", limit=args.n)
    keys = last_prompt_inputs(lm, path, [r.prompt for r in reqs])
    norms = keys.norm(dim=1)
    para, neigh_min, neigh_last = [], [], []
    for i, r in enumerate(reqs):
        if r.paraphrases:
            q = last_prompt_inputs(lm, path, [p[0] for p in r.paraphrases])
            para += ((q - keys[i]).norm(dim=1) / norms[i]).tolist()
        if r.neighborhood:
            prompts = [p[0] for p in r.neighborhood]
            toks = token_inputs(lm, path, prompts, max_tokens=10**6)
            neigh_min.append(float((toks - keys[i]).norm(dim=1).min() / norms[i]))
            last = last_prompt_inputs(lm, path, prompts)
            neigh_last += ((last - keys[i]).norm(dim=1) / norms[i]).tolist()
    wiki_text = (Path(os.environ["EDITLAB_DATA"]) / "wikitext" / "wikitext-2-raw-test.txt").read_text()
    lines = [l for l in wiki_text.splitlines() if len(l.split()) > 20][:400]
    wiki = token_inputs(lm, path, lines, max_tokens=args.wiki_tokens)
    wiki_min = [(float(torch.cdist(keys[i : i + 1], wiki).min()) / float(norms[i])) for i in range(len(reqs))]
    other_keys = torch.cdist(keys, keys) / norms[:, None]
    other_keys.fill_diagonal_(float("inf"))
    out = {
        "records": f"counterfact-train[0:{len(reqs)}]", "path": path,
        "key_norm": quantiles(norms.tolist()),
        "paraphrase_last_token": quantiles(para),
        "neighbourhood_last_token": quantiles(neigh_last),
        "neighbourhood_nearest_token": quantiles(neigh_min),
        "nearest_other_edit_key": quantiles(other_keys.min(dim=1).values.tolist()),
        "wikitext_nearest_token": quantiles(wiki_min),
        "wiki_tokens": int(wiki.shape[0]),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
