"""How the server starts (ServeOptions: `so8t serve`'s own flags) and how it is set up (ServeSettings: limits,
sampling defaults, the API key), each option declared once with its default and help; and the bounds every model
request obeys."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from services.think_api.backends.protocol import GenRequest
from services.think_api.web.errors import ApiError
from shared.config import StrictModel
from shared.think_format import Format, has_template_token


class ServeOptions(StrictModel):
    """What `so8t serve` starts: the backend and its model, where it listens, where it audits."""

    backend: Literal["ollama", "llamacpp", "openai"] = Field(
        description="ollama: an Ollama server ($OLLAMA_HOST); llamacpp: run a GGUF in this process; openai: an "
        "OpenAI-compatible engine's /v1/completions (llama-server, vLLM, SGLang) at --upstream"
    )
    model: str = Field(description="Ollama model name:tag, the GGUF file for llamacpp, the engine's model for openai")
    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port")
    audit_db: Path | None = Field(None, description="audit database (default $DATA_DIR/audit/think_audit.sqlite3)")
    n_ctx: int = Field(4096, gt=0, description="llamacpp: context window in tokens")
    threads: int | None = Field(None, gt=0, description="llamacpp: CPU threads (default: all)")
    timeout: float = Field(
        600.0,
        gt=0,
        description="ollama, openai: seconds allowed for each wait on the server (a whole reply, one streamed part)",
    )
    replica: str | None = Field(
        default=None,
        description="this replica's name: its audit chain is $DATA_DIR/audit/think_audit-<replica>.sqlite3 "
        "(default $SO8T_REPLICA; 'hostname': the host's name, e.g. a scaled container's)",
    )
    upstream: str | None = Field(
        default=None, description="openai: the engine's base URL, ending in /v1 (e.g. http://127.0.0.1:8080/v1)"
    )
    upstream_key_file: Path | None = Field(
        default=None, description="openai: a file holding the engine's API key (sent as Authorization: Bearer)"
    )
    idle_timeout_s: float = Field(default=5.0, gt=0, description="seconds an idle keep-alive connection stays open")
    header_timeout_s: float = Field(
        default=10.0, gt=0, description="seconds a connection may take to send a request's headers"
    )
    max_connections: int = Field(
        default=512, gt=0, description="open connections at most (one more closes the longest idle); < ulimit -n"
    )
    secret_file: Path | None = Field(
        None,
        description="the server secret (keys the thinking's hash and the audit chain; created 0600 when absent; "
        "outside $DATA_DIR): default $SO8T_SECRET_FILE, else ~/.config/so8t/server.secret",
    )
    api_key_file: Path | None = Field(
        None, description="a file holding the API key (a Docker secret); default $SO8T_API_KEY_FILE, else $SO8T_API_KEY"
    )
    audit_anchor: Path | None = Field(
        None, description="where the audit chain's head is anchored (outside the audit db's directory; also stdout)"
    )
    anchor_every: int = Field(1, gt=0, description="anchor the audit head every this many rows")
    anchor_interval_s: float = Field(10.0, gt=0, description="... or at the first row after this many seconds")
    insecure_no_key: bool = Field(
        False, description="allow listening on a non-loopback address without an API key (anyone may ask the model)"
    )


class ServeSettings(StrictModel):
    format: Format = Field("simple", description="the /think format the model was trained on (its system prompt)")
    max_request_bytes: int = Field(64 * 1024, gt=0, description="largest request body in bytes")
    max_prompt_chars: int = Field(8000, gt=0, description="longest prompt in characters (a chat's messages together)")
    max_tokens_limit: int = Field(2048, gt=0, description="largest max_tokens a request may ask")
    default_max_tokens: int = Field(512, gt=0, description="max_tokens of a request that gives none")
    temperature: float = Field(0.7, ge=0, le=2, description="sampling temperature of a request that gives none")
    top_p: float = Field(0.9, gt=0, le=1, description="top_p of a request that gives none")  # the prototype's
    api_key: str | None = Field(None, description="the key the model routes need (from $SO8T_API_KEY, never a flag)")
    # a stream waits this long for the backend's first token before it starts (so a backend that is down is an
    # HTTP error, not a stream that fails), then sends an SSE comment after every such silence while the model thinks
    stream_keepalive_s: float = Field(
        10.0,
        gt=0,
        description="streams: seconds of silence (the model thinking) before a keep-alive comment",
        json_schema_extra={"flags": {"stream_keepalive_s": "keepalive"}},
    )
    parallel: int | None = Field(
        default=None, gt=0, description="generations at once (default: what the backend runs in parallel; llamacpp 1)"
    )
    max_queue: int = Field(default=32, ge=0, description="requests waiting for a generation (beyond: 429 queue_full)")
    retry_after_s: int = Field(default=1, ge=0, description="Retry-After (seconds) of a 429 queue_full")
    body_timeout_s: float = Field(default=30.0, gt=0, description="seconds a client may take to send its request body")
    allowed_hosts: list[str] | None = Field(
        None,
        description="Host header names the server answers to ('*': any); default: localhost, 127.0.0.1, ::1 and the "
        "address it listens on",
    )
    cors_origins: list[str] = Field(
        [], description="origins a browser page may call the API from (CORS); none by default: CORS off"
    )


# the settings `so8t serve` takes as flags (the API key comes from the environment only)
SERVE_FLAGS = [
    "format",
    "max_tokens_limit",
    "max_request_bytes",
    "max_prompt_chars",
    "stream_keepalive_s",
    "parallel",
    "max_queue",
    "retry_after_s",
    "body_timeout_s",
    "allowed_hosts",
    "cors_origins",
]


def check_exposure(host: str, api_key: str | None, insecure_no_key: bool) -> None:
    """A server on a non-loopback address answers whoever reaches it: it needs an API key, or to be told so."""
    from services.think_api.web.guard import is_loopback
    from shared.errors import InputError

    if not api_key and not insecure_no_key and not is_loopback(host):
        raise InputError(
            f"--host {host} is not a loopback address and no API key is set: set $SO8T_API_KEY or "
            "--api-key-file (or $SO8T_API_KEY_FILE), or pass --insecure-no-key to serve it open on purpose"
        )


def check_limits(prompt_chars: int, max_tokens: int | None, texts: list[str], s: ServeSettings) -> None:
    """The bounds every model request obeys, whichever protocol it came in."""
    if prompt_chars > s.max_prompt_chars:
        raise ApiError(422, "prompt_too_long", f"the prompt is over {s.max_prompt_chars} characters")
    if max_tokens is not None and max_tokens > s.max_tokens_limit:
        raise ApiError(422, "max_tokens_too_large", f"max_tokens is over the limit of {s.max_tokens_limit}")
    if any(has_template_token(t) for t in texts):
        raise ApiError(400, "template_token_in_prompt", "the prompt contains a chat-template token (<|...|>)")


def sampling(
    s: ServeSettings,
    prompt: str,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
) -> GenRequest:
    return GenRequest(
        prompt,
        max_tokens or s.default_max_tokens,
        s.temperature if temperature is None else temperature,
        top_p or s.top_p,
        seed,
    )
