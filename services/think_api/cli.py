"""Serve /think and the OpenAI-compatible /v1/chat/completions: the answer only, never the thinking, all audited.

Every request is audited under DATA_DIR/audit; a backend that is down or misbehaves gives errors, not an exit.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from shared.errors import InputError
from shared.think_format import FORMATS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--backend",
        choices=("ollama", "llamacpp"),
        required=True,
        help="ollama: an Ollama server ($OLLAMA_HOST); llamacpp: run a GGUF in this process",
    )
    p.add_argument("--model", required=True, help="Ollama model name:tag, or the GGUF file for llamacpp")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="simple",
        help="the /think format the model was trained on (its system prompt)",
    )
    p.add_argument(
        "--audit-db", type=Path, default=None, help="audit database (default $DATA_DIR/audit/think_audit.sqlite3)"
    )
    p.add_argument("--max-tokens-limit", type=int, default=2048, help="largest max_tokens a request may ask (2048)")
    p.add_argument("--max-request-bytes", type=int, default=64 * 1024, help="largest request body (65536)")
    p.add_argument("--max-prompt-chars", type=int, default=8000, help="longest prompt in characters (8000)")
    p.add_argument("--n-ctx", type=int, default=4096, help="llamacpp: context window in tokens (4096)")
    p.add_argument("--threads", type=int, default=None, help="llamacpp: CPU threads (default: all)")
    p.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        help="ollama: seconds allowed for each wait on the server (a whole reply, one streamed part) (600)",
    )
    p.add_argument(
        "--keepalive",
        type=float,
        default=10.0,
        help="streams: seconds of silence (the model thinking) before a keep-alive comment (10)",
    )


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from services.think_api.app import API_KEY_ENV, ServeSettings, create_app
    from services.think_api.audit import AuditLog
    from services.think_api.backends import LlamaCppBackend, OllamaBackend
    from shared import logs
    from shared.config import validate
    from shared.stage import verified_input

    log = logs.get("think-api")
    settings = validate(
        ServeSettings,
        {
            "format": args.format,
            "max_request_bytes": args.max_request_bytes,
            "max_prompt_chars": args.max_prompt_chars,
            "max_tokens_limit": args.max_tokens_limit,
            "api_key": os.environ.get(API_KEY_ENV) or None,
            "stream_keepalive_s": args.keepalive,
        },
        "command line",
    )
    try:
        if args.backend == "llamacpp":
            if Path(args.model).is_file():  # checked against the converter's manifest: a corrupt GGUF is not served
                verified_input(args.model)
            backend = LlamaCppBackend(args.model, n_ctx=args.n_ctx, n_threads=args.threads)
        else:
            backend = OllamaBackend(args.model, timeout=args.timeout)
    except (FileNotFoundError, ValueError) as err:
        raise InputError(str(err)) from None
    audit = AuditLog(args.audit_db)
    log.info(
        "serving /think and /v1/chat/completions on http://%s:%d (backend %s, model %s, audit %s, API key %s)",
        args.host,
        args.port,
        backend.name,
        backend.model,
        audit.path,
        "required" if settings.api_key else "not set",
    )
    ok, detail = backend.health()  # a backend that is not ready yet is not a reason to stop: it may come up later
    if not ok:
        log.warning("backend not ready (%s): /healthz answers 503 and requests fail until it is", detail)
    try:
        uvicorn.run(create_app(backend, audit, settings), host=args.host, port=args.port, log_level="info")
    finally:
        backend.close()
        audit.close()
    return 0
