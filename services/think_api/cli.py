"""Serve /think and the OpenAI-compatible /v1/chat/completions: the answer only, never the thinking, all audited.

Every request is audited under DATA_DIR/audit; a backend that is down or misbehaves gives errors, not an exit.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from services.think_api.backends.protocol import Backend
from services.think_api.settings import SERVE_FLAGS, ServeOptions, ServeSettings
from shared import flags
from shared.errors import InputError


def add_arguments(p: argparse.ArgumentParser) -> None:
    flags.add(p, ServeOptions)
    flags.add(p, ServeSettings, SERVE_FLAGS)


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from services.think_api import security
    from services.think_api.app import create_app
    from services.think_api.connections import ConnectionLimits, server_config
    from shared import logs

    log = logs.get("think-api")
    opts = flags.parse(ServeOptions, args)
    settings = flags.parse(ServeSettings, args, base={"api_key": security.api_key(opts)})
    settings = security.checked(opts, settings)  # no public bind without a key; the Host allow-list
    backend = _backend(opts)
    audit = security.audit_log(opts)  # keyed with the server secret, anchored
    log.info(
        "serving /think and /v1/chat/completions on http://%s:%d (backend %s, model %s, audit %s, API key %s)",
        opts.host,
        opts.port,
        backend.name,
        backend.model,
        audit.path,
        "required" if settings.api_key else "not set",
    )
    ok, detail = backend.health()  # a backend that is not ready yet is not a reason to stop: it may come up later
    if not ok:
        log.warning("backend not ready (%s): /healthz answers 503 and requests fail until it is", detail)
    try:
        limits = ConnectionLimits(opts.idle_timeout_s, opts.header_timeout_s, opts.max_connections)
        uvicorn.Server(server_config(create_app(backend, audit, settings), opts.host, opts.port, limits)).run()
    finally:
        backend.close()
        audit.close()
    return 0


def _backend(opts: ServeOptions) -> Backend:
    """The backend `opts` names, its model checked where it is a file (a GGUF against its manifest)."""
    from services.think_api.backends import LlamaCppBackend, OllamaBackend
    from shared.stage import verified_input

    backend: Backend
    try:
        if opts.backend == "llamacpp":
            if Path(opts.model).is_file():  # checked against the converter's manifest: a corrupt GGUF is not served
                verified_input(opts.model)
            backend = LlamaCppBackend(opts.model, n_ctx=opts.n_ctx, n_threads=opts.threads)
        elif opts.backend == "openai":
            backend = _openai_backend(opts)
        else:
            backend = OllamaBackend(opts.model, timeout=opts.timeout)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(str(err)) from None
    return backend


def _openai_backend(opts: ServeOptions) -> Backend:
    from services.think_api.backends.openai import OpenAICompatBackend, read_key_file

    if not opts.upstream:
        raise InputError("--backend openai needs --upstream, the engine's base URL ending in /v1")
    if not opts.upstream.rstrip("/").endswith("/v1"):
        raise InputError(f"--upstream {opts.upstream}: give the engine's base URL ending in /v1")
    return OpenAICompatBackend(opts.upstream, opts.model, read_key_file(opts.upstream_key_file), timeout=opts.timeout)
