"""Evaluation metrics (CounterFact scores, token accuracy, generation exact match, fluency)."""

from .fluency import ngram_entropy
from .metrics import CF_KEYS, PreEdit, evaluate_request, evaluate_requests, generation_exact_match, pre_edit, summarize

__all__ = ["ngram_entropy", "CF_KEYS", "PreEdit", "evaluate_request", "evaluate_requests", "generation_exact_match", "pre_edit", "summarize"]
