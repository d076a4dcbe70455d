"""`editlab pitfalls`: every pitfall suite and the sequential-collapse probes for one or more methods, at a
named budget, in one HTML report with a section per pitfall.

    plan.py     sections, budgets, `plan_pitfalls` (every check before the model loads; torch-free)
    run.py      `run_pitfalls`: suites, then the collapse run per method, rows in one result store
    report.py   `write_pitfalls_report`: tables and plots per pitfall, from templates/pitfalls.html.j2
"""

from ..lazyimport import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".plan": ("BUDGETS", "SECTIONS", "PitfallsPlan", "plan_pitfalls"),
    ".run": ("PitfallsRuns", "run_pitfalls"),
    ".report": ("write_pitfalls_report",),
})
