"""An OpenAI-compatible HTTP server for a `Pipeline` (needs the `serve` extra: fastapi, uvicorn).

    from enginehouse.serve import create_app, run_server

See docs/serving.md.
"""

from __future__ import annotations

from .app import create_app
from .server import ServerThread, run_server

__all__ = ["ServerThread", "create_app", "run_server"]
