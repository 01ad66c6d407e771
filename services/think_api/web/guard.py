"""What every request passes before a route sees it (docs/design.md "Security model"): a `Host` the server answers
to (a web page that rebinds its DNS name to 127.0.0.1 sends its own name), and for a POST a JSON body
(`Content-Type: application/json`; a cross-origin page can send `text/plain` or no type without asking the browser
first, never JSON). Refusals are JSON errors (400 `host_not_allowed`, 415 `unsupported_media_type`), counted in the
audit log's per-minute tally, never a row each. CORS stays off (no `Access-Control-*` header) unless origins are
configured (`ServeSettings.cors_origins`).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable

from starlette.types import ASGIApp, Receive, Scope, Send

from services.think_api.web.errors import error_response

LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
JSON_TYPES = ("application/json",)

Refused = Callable[[str, int, str], None]  # (path, HTTP status, code): counted, not a row each


def host_name(host: str) -> str:
    """The name of a `Host` header, without its port, lowercased (`[::1]:8000` -> `::1`)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def default_hosts(bind: str) -> list[str]:
    """The loopback names, plus the bound address when it is one address (not a wildcard)."""
    hosts = list(LOOPBACK_HOSTS)
    try:
        wildcard = ipaddress.ip_address(bind).is_unspecified
    except ValueError:
        wildcard = False
    if not wildcard and host_name(bind) not in hosts:
        hosts.append(host_name(bind))
    return hosts


def is_loopback(bind: str) -> bool:
    if bind.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(bind).is_loopback
    except ValueError:
        return False


class Guard:
    """ASGI middleware: the Host allow-list (None: any host) and JSON-only POST bodies."""

    def __init__(self, app: ASGIApp, allowed_hosts: Iterable[str] | None, refused: Refused):
        self.app, self.refused = app, refused
        hosts = None if allowed_hosts is None else {host_name(h) for h in allowed_hosts}
        self.hosts = None if hosts is None or "*" in hosts else hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        why = self._refusal(scope["method"], headers)
        if why is None:
            await self.app(scope, receive, send)
            return
        status, code, message = why
        path: str = scope["path"]
        self.refused(path, status, code)
        resp = error_response(status, code, message, openai=path.startswith("/v1/"))
        await resp(scope, receive, send)

    def _refusal(self, method: str, headers: dict[str, str]) -> tuple[int, str, str] | None:
        if self.hosts is not None and host_name(headers.get("host", "")) not in self.hosts:
            return 400, "host_not_allowed", "this server does not answer to that Host (see --allowed-hosts)"
        if method == "POST":
            ctype = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if ctype not in JSON_TYPES:
                return 415, "unsupported_media_type", "the body must be JSON (Content-Type: application/json)"
        return None
