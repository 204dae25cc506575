"""Start the explorer: open the run (refusing a damaged one), bind a socket, run uvicorn until Ctrl-C."""
from __future__ import annotations

import ipaddress
import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from ..errors import ArgumentError
from .explorer import Explorer, Limits

log = logging.getLogger("semlens_fast")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (``port`` 0: any free port)."""
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ArgumentError(f"--port must be 0..65535, got {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ArgumentError(f"--host {host!r} cannot be resolved: {exc}") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # accepted connections inherit it: without it a response written in two pieces (headers, body)
    # waits for the client's delayed ACK (~40 ms on Linux) before its second piece goes out
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind(addr)
    except OSError as exc:
        sock.close()
        raise ArgumentError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port "
                            "(0 picks a free one)") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(run: str | Path, *, host: str = "127.0.0.1", port: int = 8765, writable: bool = False,
          compare_with: Sequence[str | Path] = (), limits: Limits | None = None, allowed_hosts: list[str] | None = None,
          access_log: bool = False, say: Callable[[str], None] = print,
          on_ready: Callable[[str], None] | None = None, trust: bool = False) -> int:
    """Serve ``run`` until interrupted (Ctrl-C or SIGTERM: graceful shutdown, returns 0).

    The run is opened and checked before the port is bound, so a damaged run raises (and the CLI
    exits with its code) without ever listening. ``on_ready(url)`` is called once the socket
    listens (default: ``say`` a line with the URL).
    """
    try:
        import uvicorn

        from .app import build
    except ImportError as exc:  # pragma: no cover - the serve extra is missing
        from ..workspace import MissingArtifactError

        raise MissingArtifactError(f"`semlens serve` needs the serve extra ({exc.name} is missing): "
                                   "pip install 'semlens-fast[serve]'") from None
    ex = Explorer.open(run, writable=writable, compare_with=compare_with, limits=limits, trust=trust)
    if allowed_hosts is None:
        allowed_hosts = list(LOOPBACK) if is_loopback(host) else ["*"]
    if not is_loopback(host):
        log.warning("semlens serve: listening on %s, reachable from other machines; the API has no authentication", host)
    sock = bind(host, port)
    actual = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    app = build(ex, allowed_hosts=allowed_hosts)
    config = uvicorn.Config(app, log_level="warning", access_log=access_log, lifespan="off", server_header=False,
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    url = f"http://{shown}:{actual}/"
    if on_ready is not None:
        on_ready(url)
    else:
        say(f"semlens serve: {url} (run {ex.run.path}, {'writable' if writable else 'read-only'}; Ctrl-C stops)")
    sys.stdout.flush()
    # uvicorn shuts down gracefully on SIGINT / SIGTERM, then re-raises the signal; for a server that
    # is the normal way to stop, so both end in exit code 0
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        server.run(sockets=[sock])
    except (KeyboardInterrupt, _Terminated):
        pass
    finally:
        sock.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    say("semlens serve: stopped")
    return 0


class _Terminated(BaseException):
    """SIGTERM, re-raised by uvicorn after its graceful shutdown."""


def _terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


__all__ = ["serve", "bind", "is_loopback"]
