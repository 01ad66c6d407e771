"""How `so8t serve` puts the security model in place (docs/design.md "Security model") before it serves: the API
key (a file or the environment), no public bind without one, the Host allow-list, the server secret and the
keyed, anchored audit log."""

from __future__ import annotations

import os
from pathlib import Path

from services.think_api.app import API_KEY_ENV
from services.think_api.audit import AuditLog
from services.think_api.audit import default_path as default_audit_path
from services.think_api.secret import ServerSecret, default_path
from services.think_api.settings import ServeOptions, ServeSettings, check_exposure
from services.think_api.web.guard import default_hosts
from shared.errors import InputError

API_KEY_FILE_ENV = "SO8T_API_KEY_FILE"
ALLOWED_HOSTS_ENV = "SO8T_ALLOWED_HOSTS"  # comma-separated, when --allowed-hosts is not given (compose sets it)


def api_key(opts: ServeOptions) -> str | None:
    """--api-key-file, else $SO8T_API_KEY_FILE, else $SO8T_API_KEY; never a flag's value (it would show in ps)."""
    path = opts.api_key_file or (Path(os.environ[API_KEY_FILE_ENV]) if os.environ.get(API_KEY_FILE_ENV) else None)
    if path is None:
        return os.environ.get(API_KEY_ENV) or None
    try:
        key = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read the API key file ({err})") from None
    if not key:
        raise InputError(f"{path}: the API key file is empty")
    return key


def checked(opts: ServeOptions, settings: ServeSettings) -> ServeSettings:
    """Refuse a public bind without a key; the Host allow-list: --allowed-hosts, else $SO8T_ALLOWED_HOSTS, else the
    loopback names and the bind address."""
    check_exposure(opts.host, settings.api_key, opts.insecure_no_key)
    if settings.allowed_hosts is None:
        listed = [h.strip() for h in os.environ.get(ALLOWED_HOSTS_ENV, "").split(",") if h.strip()]
        settings = settings.model_copy(update={"allowed_hosts": listed or default_hosts(opts.host)})
    return settings


def audit_log(opts: ServeOptions) -> AuditLog:
    """The audit log keyed with the server secret (created when absent) and anchored where --audit-anchor says."""
    secret = ServerSecret.load(opts.secret_file or default_path())
    return AuditLog(
        opts.audit_db or default_audit_path(replica_name(opts.replica)),
        secret,
        anchor=opts.audit_anchor,
        anchor_every=opts.anchor_every,
        anchor_interval_s=opts.anchor_interval_s,
    )


def replica_name(given: str | None) -> str | None:
    """--replica, else $SO8T_REPLICA; 'hostname' is this host's name (each scaled container has its own)."""
    import socket

    name = given or os.environ.get("SO8T_REPLICA") or None
    return socket.gethostname() if name == "hostname" else name
