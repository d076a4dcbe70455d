"""Causal tracing: where in a model a fact is recalled (ROME's corrupt-and-restore experiment).

    from editlab.tracing import CausalTracer
    traces = CausalTracer(lm).trace("The Eiffel Tower is located in the city of", "Eiffel Tower")
    traces["mlp:10"].save_png("mlp.png")

`causal.py` holds the algorithm, `knowns.py` the known-facts data and the averaged trace (the paper's
Figure 2), `plot.py` the heatmaps.
"""

from .causal import (
    KINDS,
    CausalTracer,
    KindSpec,
    TraceResult,
    TracingError,
    UnknownFactError,
    embedding_std,
    parse_kinds,
    subject_range,
    window_layers,
)
from .knowns import CLASSES, AverageTrace, KnownFact, average_traces, known_by_model, load_knowns, trace_known_facts

__all__ = [
    "CLASSES", "AverageTrace", "KnownFact", "average_traces", "known_by_model", "load_knowns", "trace_known_facts",
    "KINDS", "CausalTracer", "KindSpec", "TraceResult", "TracingError", "UnknownFactError", "embedding_std",
    "parse_kinds", "subject_range", "window_layers",
]
