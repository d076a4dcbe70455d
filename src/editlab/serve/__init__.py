"""The web playground (`editlab serve`): edit a fact, see what moved, undo it, from a browser or through
the JSON API. `playground.py` holds the model session, `app.py` the FastAPI app, `static/` the page."""

from editlab.lazyimport import lazy_exports

__getattr__, __all__ = lazy_exports(__name__, {
    ".playground": ("Playground", "Probe", "MOVED_TV"),
    ".app": ("create_app",),
})
