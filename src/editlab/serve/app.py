"""The playground's web app: a JSON API under `/api/` (documented at `/docs`) over one `Playground`, and
the page itself (`static/`: one HTML file, one script, one stylesheet; no framework, no build step).

A user's mistake (an `EditlabError`) is answered with status 400 and `{"error": "<one line>"}`, a busy
playground with 409; the model is unchanged in both cases. Endpoints are plain (sync) functions, so
FastAPI runs them in its thread pool and a long edit never blocks `/api/status`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from .. import __version__
from ..errors import BusyError, EditlabError
from .playground import Playground

STATIC = Path(__file__).with_name("static")


class ProbeItem(BaseModel):
    prompt: str
    kind: str = "free"


class EditBody(BaseModel):
    method: str = "rome"
    prompt: str
    subject: str
    target: str
    target_true: Optional[str] = None
    hparams: dict[str, Any] = Field(default_factory=dict)
    probes: list[ProbeItem] = Field(default_factory=list)
    extend: Optional[bool] = Field(
        default=None, description="extend the newest edit (true), stack a new edit (false), or extend when the "
                                  "newest edit is of the same method and can be extended (null)")


class ProbeBody(BaseModel):
    probes: list[ProbeItem] = Field(default_factory=list)
    prompt: Optional[str] = None


class FolderBody(BaseModel):
    folder: str


class QuestionItem(BaseModel):
    question: str
    answer: str


class CheckBody(BaseModel):
    paraphrases: list[str] = Field(default_factory=list)
    neighbours: list[str] = Field(default_factory=list)
    portability: list[QuestionItem] = Field(default_factory=list)


def swagger_assets() -> Path | None:
    """The folder of Swagger UI's script and stylesheet from the `swagger-ui-bundle-v2` package, so `/docs`
    works without the internet (FastAPI's default page loads them from a CDN); None where it is absent."""
    try:
        from swagger_ui_bundle import swagger_ui_path
    except ImportError:
        return None
    path = Path(str(swagger_ui_path))
    return path if (path / "swagger-ui-bundle.js").is_file() and (path / "swagger-ui.css").is_file() else None


def create_app(playground: Playground) -> FastAPI:
    """The FastAPI app serving `playground` (one model, its edit stack) and the page."""
    app = FastAPI(title="editlab playground", version=__version__, docs_url=None, redoc_url=None,
                  description="Edit a fact in a language model, see what moved, undo it. Every call the page makes.")
    app.state.playground = playground

    @app.exception_handler(BusyError)
    def _busy(_: Request, exc: BusyError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=409)

    @app.exception_handler(EditlabError)
    def _user_error(_: Request, exc: EditlabError) -> JSONResponse:
        return JSONResponse({"error": " ".join(str(exc).split())}, status_code=400)

    @app.get("/api/info")
    def info() -> dict[str, Any]:
        """The model, the methods it can be edited with, and the edit stack."""
        return playground.info()

    @app.get("/api/status")
    def status() -> dict[str, Any]:
        """Whether an operation is running (and for how long); answered at once, even during an edit."""
        return playground.status()

    @app.get("/api/methods/{method}/hparams")
    def hparams(method: str) -> dict[str, Any]:
        """The hyper-parameters `method` uses on this model: defaults and preset, with their types."""
        return playground.method_hparams(method)

    @app.get("/api/stack")
    def stack() -> list[dict[str, Any]]:
        return playground.stack()

    @app.post("/api/edit")
    def edit(body: EditBody) -> dict[str, Any]:
        """Apply one edit on top of the stack; report the prompt and the probes before and after it."""
        return playground.apply(body.method, body.prompt, body.subject, body.target, body.target_true, body.hparams,
                                [p.model_dump() for p in body.probes], body.extend)

    @app.post("/api/probe")
    def probe(body: ProbeBody) -> dict[str, Any]:
        """The newest edit's prompt (or `prompt`) and the probes, before and after the newest edit."""
        return playground.probe([p.model_dump() for p in body.probes], body.prompt)

    @app.post("/api/undo")
    def undo() -> dict[str, Any]:
        """Restore the newest edit; `bit_exact` says the weights equal those before it."""
        return playground.undo()

    @app.post("/api/save")
    def save(body: FolderBody) -> dict[str, Any]:
        """Save the newest edit into a folder on the server's machine."""
        return playground.save(body.folder)

    @app.post("/api/load")
    def load(body: FolderBody) -> dict[str, Any]:
        """Load a saved edit onto the stack; refused for another base model or a damaged save."""
        return playground.load(body.folder)

    @app.post("/api/check")
    def check(body: CheckBody) -> dict[str, Any]:
        """A short pitfall check of the newest edit (efficacy, paraphrase, neighbourhood, portability)."""
        return playground.check(body.paraphrases, body.neighbours, [q.model_dump() for q in body.portability])

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    assets = swagger_assets()
    if assets is not None:
        app.mount("/docs-assets", StaticFiles(directory=assets), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        """The API's interactive documentation, served from this machine (no CDN)."""
        if assets is None:
            return HTMLResponse("<!doctype html><title>editlab playground API</title><p>Swagger UI is not installed "
                                "(<code>pip install swagger-ui-bundle-v2</code>); the API's description is at "
                                f"<a href='{app.openapi_url}'>{app.openapi_url}</a>.</p>")
        return get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json", title="editlab playground API",
                                   swagger_js_url="/docs-assets/swagger-ui-bundle.js",
                                   swagger_css_url="/docs-assets/swagger-ui.css",
                                   swagger_favicon_url="/docs-assets/favicon-32x32.png")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
