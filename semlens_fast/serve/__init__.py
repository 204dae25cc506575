"""``semlens serve``: an interactive explorer of a run folder in the browser, with a JSON API.

* :class:`Explorer` (:mod:`.explorer`): the run opened once and every question the pages ask,
  as plain dicts; no web framework involved.
* :func:`build` / :func:`create_app` (:mod:`.app`): the FastAPI application (pages, JSON API
  under ``/api/v1``, images), behind the safety middleware.
* :func:`serve` (:mod:`.server`): bind a socket and run uvicorn.

Needs the ``serve`` extra (FastAPI, uvicorn, Jinja2, python-multipart). See docs/serve.md.
"""
from __future__ import annotations

from .explorer import Explorer, Limits, audit_view, compute_audit

__all__ = ["Explorer", "Limits", "audit_view", "compute_audit", "build", "create_app", "serve"]


def __getattr__(name: str):  # the web stack is imported only when it is used
    if name in ("build", "create_app"):
        from . import app

        return getattr(app, name)
    if name == "serve":
        from .server import serve

        return serve
    raise AttributeError(name)
