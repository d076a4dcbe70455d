"""editlab: edit the factual knowledge of language models and measure what editing breaks.

    from editlab import load_lm, EditRequest, get_editor
    lm = load_lm("smollm2-135m")
    req = EditRequest.create("The Eiffel Tower is located in the city of", "Eiffel Tower", "Rome")
    with get_editor("rome").apply(lm, req) as edit:
        print(edit.lm.generate([req.prompt], 5))
"""

from editlab.lazyimport import lazy_exports

__version__ = "0.1.0"

# lazy imports keep `import editlab` cheap
__getattr__, __all__ = lazy_exports(__name__, {
    ".models": ("load_lm", "LM", "ArchSpec"),
    ".requests": ("EditRequest", "make_request"),
    ".methods": ("get_editor", "available_methods", "Edit"),
})
