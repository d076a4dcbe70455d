"""editlab: edit the factual knowledge of language models and measure what editing breaks.

    from editlab import load_lm, EditRequest, get_editor
    lm = load_lm("smollm2-135m")
    req = EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome")
    with get_editor("rome").apply(lm, req) as edit:
        print(edit.lm.generate([req.prompt], 5))
"""

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_lm": "editlab.models",
    "LM": "editlab.models",
    "ArchSpec": "editlab.models",
    "EditRequest": "editlab.requests",
    "make_request": "editlab.requests",
    "get_editor": "editlab.methods",
    "available_methods": "editlab.methods",
    "Edit": "editlab.methods",
}


def __getattr__(name: str) -> Any:  # lazy imports keep `import editlab` cheap
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'editlab' has no attribute {name!r}")


__all__ = list(_LAZY)
