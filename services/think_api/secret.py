"""The server secret (docs/design.md "Security model"): the key of everything derived from the thinking that leaves
the server, and of the audit chain.

`internal_reasoning_hash` is HMAC-SHA256(secret, thinking): it links a response to its audit row (the row's
`thinking_sha256` column holds the same keyed digest) and nothing more. Unkeyed, the trained thinking is a template
(the request, a domain and a label from a small vocabulary, a fixed policy sentence) and its SHA-256 could be
recovered by guessing; keyed, a client without the secret cannot test a guess.

The secret is a file of 64 hex digits (32 random bytes), `so8t serve --secret-file F` or $SO8T_SECRET_FILE, created
0600 (its directory 0700) on first start when absent. It lives outside images and outside the stages' `/data`: a
secret file under the data volume is refused.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

from shared.errors import InputError
from shared.layout import data_dir

SECRET_ENV = "SO8T_SECRET_FILE"
KEY_BYTES = 32


def default_path() -> Path:
    """$SO8T_SECRET_FILE, else $XDG_CONFIG_HOME/so8t/server.secret (~/.config/so8t/server.secret)."""
    if os.environ.get(SECRET_ENV):
        return Path(os.environ[SECRET_ENV]).expanduser()
    config = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return config / "so8t" / "server.secret"


class ServerSecret:
    """A key for HMAC-SHA256. Its repr never shows the key."""

    def __init__(self, key: bytes, source: str = "memory"):
        if len(key) < KEY_BYTES:
            raise ValueError(f"a server secret needs at least {KEY_BYTES} bytes, {source} has {len(key)}")
        self._key, self.source = key, source

    def __repr__(self) -> str:
        return f"ServerSecret(source={self.source!r})"

    @classmethod
    def ephemeral(cls) -> ServerSecret:
        """A random key held in memory only (tests, benchmarks): digests made with it cannot be checked later."""
        return cls(secrets.token_bytes(KEY_BYTES), "ephemeral")

    @classmethod
    def load(cls, path: Path, create: bool = True) -> ServerSecret:
        """The secret in `path`; with `create`, a new one written 0600 there when the file is absent."""
        path = Path(path)
        _outside_data(path)
        if not path.exists() and create:
            _create(path)
        try:
            text = path.read_text(encoding="ascii").strip()
            key = bytes.fromhex(text)
        except FileNotFoundError:
            raise InputError(f"{path}: server secret not found (so8t serve creates one)") from None
        except (ValueError, UnicodeDecodeError):
            raise InputError(f"{path}: a server secret is {2 * KEY_BYTES} hex digits on one line") from None
        if len(key) < KEY_BYTES:
            raise InputError(f"{path}: a server secret is at least {2 * KEY_BYTES} hex digits, this has {len(text)}")
        return cls(key, str(path))

    def digest(self, text: str) -> str:
        """HMAC-SHA256 of `text` (UTF-8; a lone surrogate is escaped, never an error), hex."""
        return self.mac(text.encode("utf-8", "surrogatepass"))

    def mac(self, data: bytes) -> str:
        return hmac.new(self._key, data, hashlib.sha256).hexdigest()


def _outside_data(path: Path) -> None:
    """Refuse a secret on the stages' data volume: every stage container can read (and write) it."""
    root = data_dir().resolve()
    if path.resolve().is_relative_to(root):
        raise InputError(
            f"{path}: the server secret must live outside the data volume ({root}), which every stage can read; "
            f"put it e.g. under ~/.config/so8t/ or mount it as a Docker secret"
        )


def _create(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another server created it first
        return
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets.token_hex(KEY_BYTES) + "\n")
        f.flush()
        os.fsync(f.fileno())
