"""Secrets out of everything lmforge writes for people to read: logs, MLflow params and tags,
Prefect artifacts. One rule, used by the engine's sink, cluster/'s job logs, tasks/ and flows/:

- a value whose key names a secret (token, secret, password, passwd, api_key, apikey,
  credential, private_key, auth — any case, anywhere in the key, dotted keys included) becomes
  `***`, whatever it holds;
- the password of a URL's userinfo (`scheme://user:PASSWORD@host`) becomes `***`, in any string.

Nothing else is touched: a value that merely contains such a word (a path `.../auth/...`) is not
a secret, and neither are keys like `tokenizer` or `tokens_per_s` (`token` counts only when no
letter follows it). Torch-free and dependency-free, so every layer can import it.
"""

from __future__ import annotations

import re
from typing import Any

MASK = "***"
# `token(?![a-z])` keeps `tokenizer` and `tokens` clear; `auth(?!or(?!iz))` keeps `author` and
# `authority` clear, not `authorization`
_SECRET_KEY = re.compile(r"token(?![a-z])|secret|passw(?:or)?d|api[_-]?key|credential"
                         r"|private[_-]?key|auth(?!or(?!iz))", re.IGNORECASE)
# scheme://user:password@ — the last `@` of the authority ends the password, as urlsplit reads it
_URL_PASSWORD = re.compile(r"(?P<head>\b[a-z][a-z0-9+.-]*://[^\s/?#@:]*:)[^\s/?#]+(?=@)",
                           re.IGNORECASE)


def is_secret_key(key: str) -> bool:
    return bool(_SECRET_KEY.search(key))


def redact_text(text: str) -> str:
    """`text` with every URL password masked (log lines, error messages, URIs)."""
    return _URL_PASSWORD.sub(rf"\g<head>{MASK}", text)


def redact(value: Any, key: str = "") -> Any:
    """A copy of `value` (a spec, a profile's env, a manifest, flattened params) fit to show:
    secret-named keys masked at any depth, URL passwords masked in every string. An empty value
    stays empty, so the reader still sees that nothing was set."""
    if key and is_secret_key(key) and value not in (None, ""):
        return MASK
    if isinstance(value, dict):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    if isinstance(value, str):
        return redact_text(value)
    return value
