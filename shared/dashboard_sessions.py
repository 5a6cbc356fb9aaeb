"""Dashboard sign-in sessions: an API key exchanged once for an opaque session token.

The browser holds only the token (an HttpOnly cookie); Redis holds the SHA-256 of the token
mapped to the key's id, so neither the key nor a usable token is stored anywhere a dump of
Redis would reveal. Each request re-reads the key and its tenant from the database: a revoked
key ends its sessions at once. Signing out deletes the entry.
"""

from __future__ import annotations

import hashlib
import secrets

import redis

from shared import keys

SESSION_TTL_S = 12 * 3600


def session_key(namespace: str, token: str) -> str:
    return keys.dashboard_session(namespace, hashlib.sha256(token.encode()).hexdigest())


def open_session(client: redis.Redis, namespace: str, key_id: str) -> str:
    """A new session for the key; returns the token to set as the cookie."""
    token = secrets.token_urlsafe(32)
    client.set(session_key(namespace, token), key_id, ex=SESSION_TTL_S)
    return token


def session_key_id(client: redis.Redis, namespace: str, token: str | None) -> str | None:
    if not token:
        return None
    raw = client.get(session_key(namespace, token))
    if raw is None:
        return None
    return raw.decode() if isinstance(raw, bytes) else str(raw)


def close_session(client: redis.Redis, namespace: str, token: str | None) -> None:
    if token:
        client.delete(session_key(namespace, token))
