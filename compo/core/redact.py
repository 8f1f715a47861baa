"""Secrets out of everything compo writes or reports: config.yaml, ``compo config``, trackers.

:func:`redact` replaces the value of every secret-looking key (by its words, not substrings:
``hf_token`` and ``api_key`` are secret, ``max_tokens`` and ``api_key_env`` are not) and removes
credentials from URLs in any string value (``https://user:pw@host``, ``?token=...``).
"""

from __future__ import annotations

import re
from typing import Any

#: A key is secret when one of its words (split at ``_ - .`` and camelCase) is one of these, or its
#: last word is ``key`` (``api_key``, ``hf_key``, ``X-Api-Key``) ...
SECRET_MARKERS = ("token", "secret", "secrets", "password", "passwd", "credential", "credentials", "auth",
                  "authorization", "apikey", "cookie", "bearer")
#: ... unless its last word says it holds a name, a path or a count, never the secret itself
#: (``api_key_env``, ``api_key_file``, ``token_param``, ``pad_token_id``; ``max_tokens`` has no marker).
SECRET_EXEMPT_LAST = ("env", "file", "path", "param", "id")
_URL_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/\s@]+@")
_URL_QUERY = re.compile(r"([?&])([^=&#\s]+)=([^&#\s]*)")


def secret_key(key: Any) -> bool:
    """Whether a config key names a secret (see :data:`SECRET_MARKERS`)."""
    words = [w for w in re.split(r"[^a-z0-9]+", re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", str(key)).lower()) if w]
    if not words or words[-1] in SECRET_EXEMPT_LAST:
        return False
    return words[-1] == "key" or any(w in SECRET_MARKERS for w in words)


def _redact_text(text: str) -> str:
    """A string with URL credentials removed: ``https://user:pw@host`` -> ``https://***@host``,
    and secret query parameters (``?token=...``) -> ``***``."""
    if "://" not in text:
        return text
    text = _URL_USERINFO.sub(r"\1***@", text)
    return _URL_QUERY.sub(lambda m: f"{m[1]}{m[2]}=***" if m[3] and secret_key(m[2]) else m[0], text)


def redact(obj: Any) -> Any:
    """Copy of a config dict with secret values replaced by ``***`` (never dump API keys, tokens,
    passwords), and credentials removed from URL-like strings anywhere in it."""
    if isinstance(obj, dict):
        return {k: ("***" if v and secret_key(k) else redact(v)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return _redact_text(obj)
    return obj
