"""Run the app under uvicorn: in the foreground (`enginehouse serve`) or on a background thread."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

import uvicorn

from ..chat_cli import warn_once_about_builtin_templates
from ..pipeline import Pipeline
from .app import create_app
from .connections import connection_cap, guarded_protocol
from .state import ServerLimits


def uvicorn_config(app: Any, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's settings for `app`, with the app's limits on connections
    (--header-read-timeout, --max-connections) where it is one of ours."""
    state = getattr(getattr(app, "state", None), "server", None)
    limits = getattr(state, "limits", None) or ServerLimits()
    protocol = guarded_protocol(limits.header_read_timeout, connection_cap(limits.max_connections))
    return uvicorn.Config(app, http=protocol, **kwargs)


def run_server(
    pipe: Pipeline,
    host: str = "127.0.0.1",
    port: int = 8000,
    model_name: str | None = None,
    api_key: str | None = None,
    log_level: str = "info",
    local_media_path: str | None = None,
    limits: ServerLimits | None = None,
    default_chat_template_kwargs: dict | None = None,
    enable_lora_runtime_loading: bool = False,
) -> None:
    """Serve `pipe` until Ctrl-C or SIGTERM, then return; the caller then closes `pipe`.

    uvicorn shuts down gracefully on either signal and then raises it again; SIGTERM is
    turned into the same KeyboardInterrupt as Ctrl-C so that it, too, ends here.
    """
    warn_once_about_builtin_templates()
    app = create_app(
        pipe,
        model_name,
        api_key,
        local_media_path,
        limits,
        default_chat_template_kwargs,
        enable_lora_runtime_loading,
    )
    server = uvicorn.Server(uvicorn_config(app, host=host, port=port, log_level=log_level))
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


class ServerThread:
    """A real uvicorn server on a daemon thread, for tests, benchmarks and notebooks.

    `port=0` takes a free port; `url` tells which one. Use as a context manager.
    """

    def __init__(self, app: object, host: str = "127.0.0.1", port: int = 0) -> None:
        config = uvicorn_config(app, host=host, port=port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.host = host
        self._thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def start(self, timeout: float = 30.0) -> ServerThread:
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start; see the log above")
            time.sleep(0.01)
        return self

    @property
    def port(self) -> int:
        return self.server.servers[0].sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
