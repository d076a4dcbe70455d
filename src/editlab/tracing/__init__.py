"""Causal tracing: where in a model a fact is recalled (ROME's corrupt-and-restore experiment).

    from editlab.tracing import CausalTracer
    traces = CausalTracer(lm).trace("The Eiffel Tower is located in the city of", "Eiffel Tower")
    traces["mlp:10"].save_png("mlp.png")

`causal.py` holds the algorithm, `knowns.py` the known-facts data and the averaged trace (the paper's
Figure 2), `edit_layer.py` the cached averages and the edit layer they give (`layer=auto`), `plot.py`
the heatmaps. Names are imported on first use: `kinds` (what a trace restores,
the errors) loads without torch.
"""

from editlab.lazyimport import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".kinds": ("KINDS", "KindSpec", "TracingError", "UnknownFactError", "parse_kinds"),
    ".edit_layer": ("NoTraceError", "TracedLayer", "edit_layer_from_trace", "save_averages", "trace_cache_path"),
    ".causal": ("CausalTracer", "TraceResult", "embedding_std", "subject_range", "window_layers"),
    ".knowns": (
        "CLASSES", "AverageTrace", "KnownFact", "average_traces", "known_by_model", "load_knowns",
        "trace_known_facts",
    ),
})
