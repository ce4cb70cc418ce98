"""The one redactor: every string that leaves the plugin goes through :func:`redact`.

Terminal lines (the results table, notes, progress), server log lines streamed at
``-v``, the log tail in a start-up error, every test report's text (so pytest's
terminal output and JUnit XML), and every file written through ``atomic`` are
passed through it. It replaces

* every secret registered with :func:`add_secret` (the API key, from the variable
  ``--infmax-api-key-env`` names, registered wherever a server configuration reads it);
* the credentials of a URL (``http://user:password@host`` becomes ``http://***@host``,
  ``postgresql://user:password@host/db`` becomes ``postgresql://***@host/db``);
* a ``password=`` parameter (libpq's ``?password=...`` in a URL, ``password=...`` in a
  connection string) becomes ``password=***``;
* a bearer token (``Bearer sk-...`` becomes ``Bearer ***``), whoever printed it;
* the value of a secret command-line flag (``--api-key VALUE``, ``--token=VALUE``)

with ``***``. It is the lowest layer of the package: anything may import it.
"""

from __future__ import annotations

import re
import threading

MASK = "***"
# Flags whose value is a secret in the engines' command lines.
SECRET_FLAGS = ("--api-key", "--api_key", "--token", "--hf-token", "--hf_token", "--auth-token")
_MIN_SECRET = 4  # shorter values would mask ordinary words

_lock = threading.Lock()
_secrets: tuple[str, ...] = ()

_URL_CREDENTIALS = re.compile(r"://[^/\s@'\"<>]+@")  # a literal start: fast on large texts
_PASSWORD_PARAM = re.compile(r"(?P<key>\bpassword=)(?!\*\*\*)(?P<q>')?(?(q)(?:[^'\\]|\\.)*'|[^\s&'\"]+)", re.I)
_BEARER = re.compile(r"(?P<word>[Bb]earer\s+)(?!\*\*\*)[^\s'\",;]+")
_FLAG_VALUE = re.compile(
    r"(?P<flag>(?:"
    + "|".join(re.escape(f) for f in SECRET_FLAGS)
    + r")(?:=|\s+))(?!['\"]?\*\*\*)(?P<q>['\"]?)[^\s'\"\\]+(?P=q)"
)


def add_secret(value: str | None) -> None:
    """Mask ``value`` wherever it appears from now on (in this process)."""
    global _secrets
    if not value or len(value) < _MIN_SECRET:
        return
    with _lock:
        if value not in _secrets:
            # longest first: a secret that contains another is masked whole
            _secrets = tuple(sorted((*_secrets, value), key=len, reverse=True))


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with every registered secret, ``secrets``, URL credentials, bearer tokens and
    secret flag values replaced by ``***``."""
    if not text:
        return text
    for secret in (*secrets, *_secrets):
        if secret and secret in text:
            text = text.replace(secret, MASK)
    if "://" in text and "@" in text:
        text = _URL_CREDENTIALS.sub("://" + MASK + "@", text)
    if "assword=" in text or "ASSWORD=" in text:
        text = _PASSWORD_PARAM.sub(lambda m: m.group("key") + MASK, text)
    if "earer" in text:
        text = _BEARER.sub(lambda m: m.group("word") + MASK, text)
    if "--" in text:
        text = _FLAG_VALUE.sub(lambda m: m.group("flag") + MASK, text)
    return text


def redact_argv(argv: tuple[str, ...] | list[str], *secrets: str | None) -> list[str]:
    """argv with known secrets and the values of secret flags replaced by ``***``."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(MASK)
            hide_next = False
            continue
        flag, eq, _ = arg.partition("=")
        if flag in SECRET_FLAGS:
            if eq:
                out.append(f"{flag}={MASK}")
                continue
            hide_next = True
        out.append(redact(arg, *secrets))
    return out
