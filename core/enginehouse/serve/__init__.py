"""An OpenAI-compatible HTTP server for a `Pipeline` (needs the `serve` extra: fastapi, uvicorn).

    from enginehouse.serve import create_app, run_server

See docs/serving.md.
"""

from __future__ import annotations

from .app import create_app
from .server import ServerThread, run_server
from .state import ServerLimits

__all__ = ["ServerLimits", "ServerThread", "create_app", "run_server"]
