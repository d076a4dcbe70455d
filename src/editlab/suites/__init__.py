"""Pitfall suites: the survey's failure modes as benchmark suites (data + editing protocol + metrics),
registered by name. `editlab suites` lists them; `editlab eval --suite NAME --method M` runs one.

    base.py       Suite, Unit, Editing (applies and undoes a protocol's edits), record-field errors
    scoring.py    g(o|x), fact probability over prompt sets, JS/KL, answer matching
    metrics.py    every metric's metadata (direction, range, unit, source)
    runner.py     plan (checked before the model loads) and run, rows in the result store
    one module per suite

Definitions and protocols: docs/pitfalls.md.
"""

from __future__ import annotations

import inspect
from typing import Any, Mapping

from ..errors import EditlabError
from ..registry import Registry, lazy
from .base import Suite, SuiteError, Unit
from .metrics import METRICS, MetricInfo, metric_info

SUITES: Registry[type[Suite]] = Registry("suite", SuiteError)
SUITES.register("specificity-plus", "CounterFact+: neighbourhood score with the edit statement prefixed (NS+), "
                "neighbourhood KL of the next-token distribution", lazy("editlab.suites.specificity_plus:SpecificityPlus"),
                aliases=("cfplus",))

SUITES.register("conflict", "ConflictEdit: two logically tied edits in a row (coverage, reverse, composite); does the later "
                "fact win, and what does it cost the earlier and the tied fact", lazy("editlab.suites.conflict:Conflict"))
SUITES.register("distortion", "RoundEdit: edit a->b then back b->a; JS divergence over the subject's true objects, "
                "ignore and failure rates", lazy("editlab.suites.distortion:Distortion"), aliases=("roundedit",))
SUITES.register("distortion-mle", "RoundEdit with Multi-Label Edit: the way back is one batch edit to every true object "
                "(batch methods only)", lazy("editlab.suites.distortion:DistortionMLE"), aliases=("roundedit-mle",))

SUITES.register("mquake", "MQuAKE-hard: every hop of a 4-hop chain edited (one case at a time); are the facts recalled, "
                "does the multi-hop answer follow", lazy("editlab.suites.mquake:MQuAKE"))
SUITES.register("mquake-batch", "MQuAKE-hard with k = 100 and all cases edited together (batch methods edit one batch, "
                "others edit in sequence)", lazy("editlab.suites.mquake:MQuAKEBatch"))

SUITES.register("counterfact", "CounterFact with its consequences: ES/PS/NS, one-hop and subject-replace portability, other "
                "attribution, optional fluency", lazy("editlab.suites.portability:CounterFactSuite"))
SUITES.register("zsre", "zsRE with its consequences: token accuracy, locality, one-hop, inverse-relation and "
                "subject-replace portability", lazy("editlab.suites.portability:ZsreSuite"))
SUITES.register("knowedit", "KnowEdit (wiki_recent, wiki_counterfact, zsRE, WikiBio): edit success, portability "
                "(reasoning, subject aliasing, logical generalization), locality (relation specificity, forgetfulness)",
                lazy("editlab.suites.knowedit:KnowEditSuite"))
SUITES.register("dialogue", "Dialogue robustness: after an edit, a conversation follows up on, contradicts and builds on "
                "it; does the model keep the new fact, revert to the old one or say neither", lazy("editlab.suites.dialogue:Dialogue"))

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def _coerce_option(suite: str, key: str, value: Any, default: Any) -> Any:
    """A suite option given as text (CLI `--suite-set key=value`) in the type of its default; a
    comma-separated value becomes a list where the default has no type of its own (e.g. mquake's k)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if isinstance(default, bool):
        if text.lower() in _TRUE | _FALSE:
            return text.lower() in _TRUE
        raise SuiteError(f"suite {suite!r}: option {key} expects true or false, got {value!r}")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise SuiteError(f"suite {suite!r}: option {key} expects an integer, got {value!r}") from None
    if default is None and "," in text:
        return [part.strip() for part in text.split(",") if part.strip()]
    return text


def suite_options(name: str) -> dict[str, Any]:
    """The options the suite's constructor takes, with their defaults."""
    params = inspect.signature(SUITES.get(name).__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self" and p.default is not inspect.Parameter.empty}


def get_suite(name: str, options: Mapping[str, Any] | None = None) -> Suite:
    """An instance of the suite registered under `name` (or an alias), built with `options` (names
    checked against its constructor, text values coerced to the defaults' types)."""
    cls = SUITES.get(name)
    allowed = suite_options(name)
    kwargs = {}
    for key, value in (options or {}).items():
        if key not in allowed:
            known = ", ".join(f"{k} (default {v!r})" for k, v in allowed.items()) or "none"
            raise SuiteError(f"suite {SUITES.resolve(name)!r} has no option {key!r}; its options: {known}")
        kwargs[key] = _coerce_option(SUITES.resolve(name), key, value, allowed[key])
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        if isinstance(e, EditlabError):
            raise
        raise SuiteError(f"suite {SUITES.resolve(name)!r}: bad option value: {e}") from None


__all__ = ["METRICS", "MetricInfo", "SUITES", "Suite", "SuiteError", "Unit", "get_suite", "metric_info", "suite_options"]
