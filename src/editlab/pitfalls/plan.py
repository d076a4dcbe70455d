"""What `editlab pitfalls` runs: every pitfall suite and the sequential-collapse run with its probes,
at a named budget, checked in full before any model loads (torch-free).

A budget fixes, per suite, the number of records (per split where the suite has splits), and for the
collapse run the length of the edit stream, its checkpoints and the probe budget. `quick` is sized to
finish in under 25 minutes for ROME on a 2-core CPU with SmolLM2-135M (14 min idle; docs/pitfalls.md
gives the measured times); `full` is the documented protocol sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import OptionError
from ..suites.base import SuiteError


@dataclass(frozen=True)
class Section:
    """One pitfall of the report: what it is (one sentence), which suites measure it, and its plot."""

    key: str
    title: str
    sentence: str
    suites: tuple[str, ...]
    plot: str  # "relations" | "distortion" | "collapse" | "bars"


SECTIONS: tuple[Section, ...] = (
    Section("portability", "Portability and ripple effects",
            "An edit should carry to its consequences: questions one hop away, the subject under another name, the "
            "inverse relation, logical and compositional consequences (KnowEdit).",
            ("counterfact", "zsre", "knowedit"), "relations"),
    Section("multihop", "Multi-hop reasoning over edited facts",
            "When every fact of a chain is edited, the multi-hop question should follow the new chain (MQuAKE).",
            ("mquake", "mquake-batch"), "bars"),
    Section("conflict", "Knowledge conflict",
            "Two logically tied edits in a row: does the later fact win, and what do they cost the earlier and the "
            "tied fact (ConflictEdit)?", ("conflict",), "bars"),
    Section("distortion", "Knowledge distortion",
            "An edit a→b and back b→a should leave the subject's other true objects as they were; the JS divergence "
            "says how far their distribution moved (RoundEdit).", ("distortion", "distortion-mle"), "distortion"),
    Section("specificity", "Neighbourhood specificity (CounterFact+)",
            "Prompts about other subjects should keep their answers, even with the edit statement written before "
            "them, and their whole next-token distribution should not move.", ("specificity-plus",), "bars"),
    Section("dialogue", "Robustness in dialogue",
            "In a conversation that follows up on, contradicts or builds on the edit, does the model keep the new "
            "fact, go back to the old one (reversion) or say neither (confusion)?", ("dialogue",), "bars"),
    Section("collapse", "General ability as edits accumulate",
            "Edits applied one after another without restore: do earlier edits hold, and do perplexity, downstream "
            "tasks and unrelated next-token distributions stay where the unedited model had them?", (), "collapse"),
)


@dataclass(frozen=True)
class Budget:
    name: str
    limits: Mapping[str, int]  # suite -> records (per split)
    stream: int  # edits in the collapse run (first records of `stream_data`)
    checkpoints: tuple[int, ...]
    probes: tuple[str, ...]
    probe_budget: str
    stream_data: str = "counterfact"  # the shipped portability records (spec section 2.7)
    options: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # suite -> its options at this budget


BUDGETS: dict[str, Budget] = {
    # 0 records: the suite is not in this budget (the report says so). mquake-batch edits 100 cases (400 facts)
    # per unit and distortion-mle needs a batch method: neither fits a quick look.
    "quick": Budget("quick", {"counterfact": 3, "zsre": 2, "knowedit": 1, "mquake": 1, "mquake-batch": 0, "conflict": 1,
                              "distortion": 2, "distortion-mle": 0, "specificity-plus": 5, "dialogue": 5},
                    stream=10, checkpoints=(0, 5, 10), probes=("perplexity", "downstream", "nkl", "norm"),
                    probe_budget="quick"),
    "full": Budget("full", {"counterfact": 50, "zsre": 34, "knowedit": 25, "mquake": 25, "mquake-batch": 1, "conflict": 34,
                            "distortion": 50, "distortion-mle": 50, "specificity-plus": 100, "dialogue": 100},
                   stream=200, checkpoints=(0, 10, 25, 50, 100, 200), probes=("perplexity", "downstream", "nkl", "norm"),
                   probe_budget="full", options={"mquake-batch": {"k": [100]}}),  # one group of 100 cases
}


@dataclass
class PitfallsPlan:
    """Everything checked before the model loads: the methods, the budget, one suite plan per suite
    (data read and parsed), the collapse stream's requests and the probes (data present)."""

    methods: list[str]
    budget: Budget
    suite_plans: dict[str, Any] = field(default_factory=dict)  # suite -> SuitePlan
    stream: list[Any] = field(default_factory=list)  # EditRequests of the collapse run
    hparams: dict[str, Any] = field(default_factory=dict)  # overrides applied to every method
    seed: int = 0
    notes: dict[str, str] = field(default_factory=dict)  # suite -> why it (or a method of it) does not run


def budget_named(name: str) -> Budget:
    if name not in BUDGETS:
        raise OptionError(f"--budget must be one of {', '.join(BUDGETS)}, got {name!r}")
    return BUDGETS[name]


def section_names() -> list[str]:
    return [s.key for s in SECTIONS]


def plan_pitfalls(methods: Sequence[str], budget: str = "quick", *, only: Sequence[str] | None = None,
                  hparams: Mapping[str, Any] | None = None, seed: int = 0, on_bad: str = "skip") -> PitfallsPlan:
    """Resolve methods, budget and sections (`only`: a subset of `section_names()`), read every suite's
    data and the collapse stream, check the probes' data. Raises editlab's named errors, no model needed.
    Records lacking a field are skipped with a warning (`on_bad="skip"`, the default), so one odd record
    does not stop a long run; `on_bad="stop"` refuses the run instead, naming the record and field."""
    from ..methods.catalogue import METHODS

    b = budget_named(budget)
    if on_bad not in ("stop", "skip"):
        raise OptionError(f"--on-bad must be stop or skip, got {on_bad!r}")
    if not methods:
        raise OptionError("no method given; name at least one (see `editlab methods`)")
    names = [METHODS.resolve(m) for m in methods]
    if len(set(names)) != len(names):
        raise OptionError(f"a method is named twice in {', '.join(methods)}")
    keys = section_names()
    chosen = list(only) if only else keys
    unknown = [k for k in chosen if k not in keys]
    if unknown:
        raise OptionError(f"unknown pitfall section {unknown[0]!r}; choose from {', '.join(keys)}")
    plan = PitfallsPlan(names, b, hparams=dict(hparams or {}), seed=seed)
    from ..suites import suite_options
    from ..suites.runner import plan_suite

    from ..methods import get_editor
    from ..suites import get_suite

    for sec in SECTIONS:
        if sec.key not in chosen:
            continue
        for suite in sec.suites:
            if not b.limits.get(suite):
                plan.notes[suite] = (f"not in the {b.name} budget; run it with `editlab eval --suite {suite}` "
                                     "or `editlab pitfalls --budget full`")
                continue
            options = {**({"seed": seed} if "seed" in suite_options(suite) else {}), **b.options.get(suite, {})}
            able, why = [], []
            for m in names:  # a method the suite's protocol cannot use is left out of that suite, with the reason
                try:
                    get_suite(suite, options or None).check_method(get_editor(m))
                    able.append(m)
                except SuiteError as e:
                    why.append(str(e))
            if why:
                plan.notes[suite] = " ".join(why) + ("" if able else f"; {suite} is not run")
            if able:
                plan.suite_plans[suite] = plan_suite(suite, able, limit=b.limits[suite], on_bad=on_bad,
                                                     options=options or None)
    if "collapse" in chosen:
        from ..data import load_requests
        from ..probes import get_probes

        plan.stream = list(load_requests(b.stream_data, limit=b.stream))
        if len(plan.stream) < b.stream:
            raise OptionError(f"the collapse stream needs {b.stream} records of {b.stream_data}; the data has {len(plan.stream)}")
        get_probes(list(b.probes), b.probe_budget)
    return plan


__all__ = ["BUDGETS", "Budget", "PitfallsPlan", "SECTIONS", "Section", "budget_named", "plan_pitfalls", "section_names"]
