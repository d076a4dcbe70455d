"""The playground under load, on the real SmolLM2: the first edit end to end through the API (statistics
cached), probe round trips from one client (the same probes again, answered from the playground's cache;
five new prompts, measured before and after the edit), then 200 probe requests (four probes seen before
and one new prompt each) from 8 concurrent clients; prints median and p95 latency, errors, and whether
the model's weights are unchanged by the probes.

    python benchmarks/bench_serve.py [--requests 200] [--clients 8] [--model smollm2-135m] [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import common  # noqa: F401 (puts src/ on the path)

PROBES = [{"prompt": "The Eiffel Tower can be found in the city of", "kind": "paraphrase"},
          {"prompt": "Where is the Eiffel Tower? It is in", "kind": "paraphrase"},
          {"prompt": "The Louvre is located in the city of", "kind": "neighbour"},
          {"prompt": "The Colosseum is located in the city of", "kind": "neighbour"},
          {"prompt": "The capital of France is", "kind": "free"}]
FACT = {"method": "rome", "prompt": "The Eiffel Tower is located in the city of", "subject": "Eiffel Tower",
        "target": "Rome", "target_true": "Paris", "probes": PROBES}


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="weights' dtype (bfloat16 runs about 3x faster than float32 on CPUs with AVX512-BF16)")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    args = ap.parse_args()
    import httpx
    import uvicorn

    from editlab.models import load_lm
    from editlab.serve import Playground, create_app
    from editlab.serve.app import STATIC

    lm = load_lm(args.model, dtype=args.dtype)
    # the target is the first edit with statistics cached: compute (or read) ROME's statistics first
    from editlab.methods import get_editor
    from editlab.stats import second_moments

    hp = get_editor("rome").hparams(lm)
    t = time.perf_counter()
    second_moments(lm, hp.statistics_layers(), hp.corpus, hp.mom2_n_tokens)
    print(f"{args.dtype}: ROME statistics ready in {time.perf_counter() - t:.1f} s (cached on disk after the first run)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    playground = Playground(lm)
    t = time.perf_counter()
    playground.prepare("rome")  # as `editlab serve` does before it listens
    print(f"prepared rome (context templates) in {time.perf_counter() - t:.2f} s, before listening")
    server = uvicorn.Server(uvicorn.Config(create_app(playground), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/api"
    page = sum(p.stat().st_size for p in STATIC.iterdir())
    print(f"page weight: {page / 1024:.1f} KB (html + js + css)")
    with httpx.Client(timeout=600) as c:
        t = time.perf_counter()
        r = c.post(f"{url}/edit", json=FACT)
        r.raise_for_status()
        body = r.json()
        print(f"first edit end to end: {time.perf_counter() - t:.2f} s (edit itself {body['seconds']:.2f} s); top after: "
              f"{body['after'][0]['top'][0][0]!r}, before: {body['before'][0]['top'][0][0]!r}")
        fingerprint = lm.fingerprint()
        for label, fresh in (("same 5 probes again (cached)", False), ("5 new prompts each time", True)):
            times = []
            for i in range(10):
                probes = [{**p, "prompt": f"{p['prompt']} (take {i})" if fresh else p["prompt"]} for p in PROBES]
                t = time.perf_counter()
                c.post(f"{url}/probe", json={"probes": probes}).raise_for_status()
                times.append(time.perf_counter() - t)
            print(f"probe round trip, one client, {label}: median {statistics.median(times) * 1000:.0f} ms")

    latencies: list[float] = []
    errors: list[str] = []

    def one(i: int) -> None:
        with httpx.Client(timeout=600) as c:
            t = time.perf_counter()
            # four probes seen before and one new free prompt per request
            probes = PROBES[:4] + [{"prompt": f"Request {i}: the best city to visit is", "kind": "free"}]
            r = c.post(f"{url}/probe", json={"probes": probes})
            latencies.append(time.perf_counter() - t)
            if r.status_code != 200:
                errors.append(f"{r.status_code}: {r.text[:100]}")

    t = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        list(pool.map(one, range(args.requests)))
    wall = time.perf_counter() - t
    print(f"{args.requests} probe requests (4 probes seen before + 1 new prompt each) from {args.clients} clients: median {statistics.median(latencies) * 1000:.0f} ms, "
          f"p95 {pct(latencies, 0.95) * 1000:.0f} ms, {args.requests / wall:.1f} requests/s, errors {len(errors)}")
    for e in errors[:3]:
        print("  error:", e)
    print(f"weights unchanged by the probes: {lm.fingerprint() == fingerprint}; edits applied: {len(lm.active_edits)}")
    server.should_exit = True


if __name__ == "__main__":
    main()
