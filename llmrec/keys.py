"""API keys for the served recommendations: created once, stored only as salted hashes.

A key reads `llmrec_<key id>_<secret>`. The key id finds the stored entry without trying
every hash; the secret is 32 random bytes, so one salted SHA-256 resists guessing as well as
a slow password hash would, at a cost a request can afford. The file
(`LLMREC_HOME/api_keys.json`, mode 0600) holds per key: name, scope, salt, hash, created,
revoked; revoking keeps the entry (nothing is deleted) and the service sees it at once,
because it re-reads the file when its modification time changes.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

from llmrec.errors import LlmrecError
from llmrec.files import replace_atomically

Scope = Literal["read", "admin"]
SCOPES = ("read", "admin")
PREFIX = "llmrec"


def keys_file(home_root: Path) -> Path:
    return Path(home_root) / "api_keys.json"


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class KeyEntry:
    key_id: str
    name: str
    scope: str
    created: str
    revoked: str | None

    def allows(self, scope: str) -> bool:
        return self.scope == "admin" or self.scope == scope


class KeyStore:
    """The key file of one LLMREC_HOME."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._stamp: tuple[int, int] | None = None
        self._entries: dict[str, dict] = {}

    def _read(self) -> dict[str, dict]:
        if not self.path.exists():
            return {}
        try:
            return json.loads(self.path.read_text())["keys"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise LlmrecError(f"{self.path}: not an llmrec API key file ({error})") from error

    def _write(self, entries: dict[str, dict]) -> None:
        def write(tmp: Path) -> None:
            # Created 0600 before any byte is written, so the hashes are never world-readable.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as handle:
                json.dump({"keys": entries}, handle, indent=1)

        replace_atomically(self.path, write)
        os.chmod(self.path, 0o600)

    def create(self, name: str, scope: str) -> str:
        """Store a new key and return it; this is the only time the secret exists in clear."""
        if scope not in SCOPES:
            raise LlmrecError(f"--scope {scope!r}: must be one of {', '.join(SCOPES)}")
        if not name.strip():
            raise LlmrecError("--name: must not be empty")
        entries = self._read()
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        entries[key_id] = {"name": name, "scope": scope, "salt": salt, "hash": _digest(salt, secret),
                           "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "revoked": None}
        self._write(entries)
        return f"{PREFIX}_{key_id}_{secret}"

    def list(self) -> list[KeyEntry]:
        return [KeyEntry(key_id, e["name"], e["scope"], e["created"], e.get("revoked"))
                for key_id, e in self._read().items()]

    def revoke(self, name_or_id: str) -> list[str]:
        """Revoke every active key with this id or name; returns the ids revoked."""
        entries = self._read()
        hits = [k for k, e in entries.items() if (k == name_or_id or e["name"] == name_or_id) and not e.get("revoked")]
        if not hits:
            raise LlmrecError(f"no active API key with id or name {name_or_id!r} in {self.path}")
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        for key_id in hits:
            entries[key_id]["revoked"] = stamp
        self._write(entries)
        return hits

    def _fresh(self) -> dict[str, dict]:
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            self._entries = self._read() if stamp is not None else {}
            self._stamp = stamp
        return self._entries

    def verify(self, key: str | None) -> KeyEntry | None:
        """The active entry a presented key belongs to, or None. The hash comparison is
        constant-time; a malformed or unknown key costs the same hash as a real one."""
        entries = self._fresh()
        key_id, secret = "", key or ""
        parts = (key or "").split("_", 2)
        if len(parts) == 3 and parts[0] == PREFIX:
            key_id, secret = parts[1], parts[2]
        entry = entries.get(key_id)
        salt = entry["salt"] if entry else "00" * 16
        expected = entry["hash"] if entry else "0" * 64
        matches = hmac.compare_digest(_digest(salt, secret), expected)
        if entry is None or not matches or entry.get("revoked"):
            return None
        return KeyEntry(key_id, entry["name"], entry["scope"], entry["created"], entry.get("revoked"))
