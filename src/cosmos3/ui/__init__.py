"""The playground: a Gradio app mounted on the server's FastAPI app, driving the same engine and job queue.

    cosmos3.ui.mount(app, "/ui")                 # `cosmos3 serve --ui`: beside the HTTP routes
    cosmos3.ui.serve(engine, settings, host, port)   # `cosmos3 ui`: the routes and the playground at /

Modules: `app` (layout and handlers), `bridge` (jobs and Reasoner conversations through the server's worker),
`plot` (the action plot drawn when a result folder has none)."""

from __future__ import annotations

from typing import Any

__all__ = ["build", "mount", "serve"]


def __getattr__(name: str) -> Any:  # gradio is imported on first use, not by `cosmos3.ui.plot`
    if name in __all__:
        from cosmos3.ui import app

        return getattr(app, name)
    raise AttributeError(f"module 'cosmos3.ui' has no attribute {name!r}")
