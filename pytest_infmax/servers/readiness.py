"""Is the server ready? One bounded probe of ``/health`` and ``/v1/models``.

Every GET goes through :mod:`pytest_infmax.boundedhttp` (one total deadline, a body
limit, no key on a redirect to another origin). A server without a ``/health`` route,
as many hosted APIs are, is judged by ``/v1/models`` alone; 401 and 403 raise at once.
"""

from __future__ import annotations

import http.client
import json
import time

from pytest_infmax import boundedhttp
from pytest_infmax.servers.errors import ServerError

# One readiness probe (GET /health, then /v1/models) gets at most this long in all; the
# startup deadline bounds it too, so a server that drips its answer cannot outlast it.
PROBE_TIMEOUT = 5.0


def _http_get(url: str, api_key: str | None, timeout: float = 2.0, deadline: float | None = None) -> tuple[int, bytes]:
    """GET within ``timeout`` seconds in all (or by ``deadline``) and a bounded body
    (``boundedhttp``); the key is never sent on a redirect to another origin."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = boundedhttp.get(url, headers=headers, timeout=timeout, deadline=deadline)
    return response.status, response.body


def probe_ready(
    base_url: str, api_key: str | None, api_key_env: str = "INFMAX_API_KEY", timeout: float = PROBE_TIMEOUT
) -> str | None:
    """The served model name if the server answers /health and /v1/models, else None.

    A refused connection, a reset and HTTP 503 all mean "not yet"; 401/403 will
    never get better by waiting, so they raise at once. Both GETs together take at
    most ``timeout`` seconds, whatever the server does.
    """
    return _probe(base_url, api_key, api_key_env, timeout)[0]


#: /health answers that mean "this server has no such route", not "not ready": many hosted
#: OpenAI-compatible APIs have no /health, and /v1/models answering 200 is enough there
_NO_HEALTH_ROUTE = frozenset({404, 405, 501})


def _probe(base_url: str, api_key: str | None, api_key_env: str, timeout: float) -> tuple[str | None, str]:
    """(model or None, why not ready) of one readiness probe within ``timeout`` seconds.

    ``/health`` is asked first (engines answer 503 there while they load); a server without
    that route is judged by ``/v1/models`` alone. 401 or 403 on either raises at once.
    """
    deadline = time.monotonic() + timeout
    try:
        status, _ = _http_get(f"{base_url}/health", api_key, timeout, deadline)
        _refuse_auth(base_url, "/health", status, api_key, api_key_env)
        if status != 200 and status not in _NO_HEALTH_ROUTE:
            return None, f"GET /health answered HTTP {status}"
        status, body = _http_get(f"{base_url}/v1/models", api_key, timeout, deadline)
    except boundedhttp.HTTPLimitError as exc:
        return None, str(exc)
    except (OSError, http.client.HTTPException) as exc:
        return None, f"{type(exc).__name__}: {exc}"
    _refuse_auth(base_url, "/v1/models", status, api_key, api_key_env)
    if status != 200:
        return None, f"GET /v1/models answered HTTP {status}"
    try:
        data = json.loads(body)["data"]
        return (str(data[0]["id"]) if data else ""), ""
    except (ValueError, KeyError, IndexError, TypeError):
        return "", ""


def _refuse_auth(base_url: str, route: str, status: int, api_key: str | None, api_key_env: str) -> None:
    """401 and 403 never get better by waiting: say so at once, and what to check."""
    if status not in (401, 403):
        return
    given = f"the key in ${api_key_env} was refused" if api_key else f"${api_key_env} is not set"
    raise ServerError(
        f"authentication failed: {boundedhttp.safe_url(base_url)}{route} answered HTTP {status} ({given}); "
        f"check {api_key_env} (or the variable --infmax-api-key-env names)"
    )


#: how long a refused connection to an endpoint is retried (a restart in progress) before it fails
REFUSED_GRACE_S = 3.0
