"""Retrieval time per query over a memory of 10,000 edited facts (issue target: <= 20 ms on CPU).

Memory: the statements ("prompt target_new") of the first 10,000 CounterFact-train records embedded with
all-MiniLM-L6-v2 (the matrix is cached on disk after the first run), or random unit vectors when the data
is absent (search time does not depend on the content). Queries: the records' rephrase prompts, which
the encoder has not seen. Three figures per query:
  - embed + search, one query at a time (what a view pays for an unseen prompt),
  - search only, one query at a time (prompt embedding already cached),
  - embed + search in batches of 64 queries (what evaluation pays: probes are scored in batches),
  - SERAC's whole scope decision (embed, 5 nearest edits, five features each, the trained head), one
    query at a time, over the same 10,000 edits (with `--serac`; needs CounterFact-train).

    OMP_NUM_THREADS=1 python benchmarks/bench_retrieval.py [--n 10000] [--queries 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10_000, help="memory entries")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--serac", action="store_true", help="also time SERAC's scope decision over the memory")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from editlab.errors import DataFormatError
    from editlab.methods.memory.retriever import Retriever, statement
    from editlab.paths import cache_dir

    r = Retriever()
    t0 = time.perf_counter()
    dim = r.embedder.dim
    print(f"encoder {r.name}: loaded in {time.perf_counter() - t0:.1f} s; torch threads {torch.get_num_threads()}")
    try:
        from editlab.data import load_requests

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reqs = load_requests("counterfact-train", limit=args.n)
        texts = [statement(q) for q in reqs]
        t0 = time.perf_counter()
        memory = r.embed_cached(texts, cache_dir("embeddings"))
        print(f"memory: {len(texts)} CounterFact-train statements embedded (or read from cache) in "
              f"{time.perf_counter() - t0:.1f} s")
        queries = [q.paraphrases[0][0] for q in reqs if q.paraphrases][: args.queries]
    except DataFormatError as e:
        print(f"CounterFact-train not found ({e}); memory of random unit vectors")
        memory = torch.nn.functional.normalize(torch.randn(args.n, dim), dim=-1)
        queries = [f"Query number {i} about some subject" for i in range(args.queries)]
    n = memory.shape[0]

    cpu: dict[str, list[float]] = {}

    def timed(fn, reps, label):
        # wall time, and the process's CPU time: on a shared machine the wall time includes waiting for
        # a CPU, while the CPU time of a one-thread run is what the query costs on an idle core
        times, cpus = [], []
        for i in range(reps):
            t, c = time.perf_counter(), time.process_time()
            fn(i)
            times.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
        cpu[label] = cpus
        return times

    fresh = Retriever(r.embedder, cache_size=0)  # every query embedded anew
    fresh.search(queries[:2], memory, k=5)  # warm-up
    single = timed(lambda i: fresh.search([queries[i]], memory, k=5), len(queries), "single")
    qvecs = r.embed(queries)
    search_only = timed(lambda i: r.search(qvecs[i : i + 1], memory, k=5), len(queries), "search")
    batched = timed(lambda i: fresh.search(queries[i * 64 : (i + 1) * 64], memory, k=5), max(1, len(queries) // 64), "batch")
    per_q_batched = sum(batched) / (max(1, len(queries) // 64) * 64)

    def ms(xs, label):
        return (f"median {1e3 * statistics.median(xs):.2f} ms, p95 {1e3 * sorted(xs)[int(0.95 * (len(xs) - 1))]:.2f} ms "
                f"wall; median {1e3 * statistics.median(cpu[label]):.2f} ms CPU")

    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"memory entries {n}, dim {dim}, top-5, {len(queries)} queries; machine: {os.cpu_count()} CPUs, "
          f"load average {load} (other processes share the CPUs: figures rise with the load)")
    print(f"embed + search, 1 query per call : {ms(single, 'single')}")
    print(f"search only,    1 query per call : {ms(search_only, 'search')}")
    n_batched = max(1, len(queries) // 64) * 64
    print(f"embed + search, 64 per call      : {1e3 * per_q_batched:.2f} ms wall, "
          f"{1e3 * sum(cpu['batch']) / n_batched:.2f} ms CPU per query")
    if args.serac and n == len(texts):
        route = serac_router(r, reqs, memory)
        route(queries[:2])
        routed = timed(lambda i: route([queries[i]]), len(queries), "serac")
        print(f"SERAC scope decision, 1 query    : {ms(routed, 'serac')}")
    for what, secs in (("wall", statistics.median(single)), ("CPU", statistics.median(cpu["single"]))):
        print(f"target <= 20 ms per query, embed + search one at a time, {what} time: "
              f"{'met' if secs <= 0.020 else 'MISSED'} ({1e3 * secs:.1f} ms)")


def serac_router(r, reqs, statements: torch.Tensor):
    """SERAC's `route` over a memory of `reqs` (statement embeddings given; prompt and subject matrices
    embedded or read from the disk cache), with the default trained head; a fresh retriever so that
    each query is embedded anew."""
    from editlab.methods.memory.retriever import EditMemory, Retriever, record_for
    from editlab.methods.memory.serac import FORMAT, SERACHparams, SERACView, train_scope_head
    from editlab.paths import cache_dir

    hp = SERACHparams()
    head = train_scope_head(r, hp.train_data, hp.train_records, hp.train_group, hp.k)
    memory = EditMemory(r.name, [record_for(q) for q in reqs], statements)
    tensors, mem_cfg = memory.state()
    tensors["serac.prompts"] = r.embed_cached([q.prompt for q in reqs], cache_dir("embeddings"))
    tensors["serac.subjects"] = r.embed_cached([q.subject for q in reqs], cache_dir("embeddings"))
    config = {"format": FORMAT, "scope": "learned", "threshold": hp.threshold, "k": hp.k, "head": head.to_dict(),
              "memory": mem_cfg, "extends": False, "below_facts": 0}
    view = SERACView(None, config, tensors)
    view._retriever = Retriever(r.embedder, cache_size=0)
    return view.route


if __name__ == "__main__":
    main()
