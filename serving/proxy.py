"""Middleware for Serve's HTTP proxy (not the ingress): it runs before the proxy reads `X-Request-ID`.

Serve's proxy takes a client's `X-Request-ID` as the request id and writes it into the prefix of every
log line of that request, in the proxy and in every replica. A client could put `tenant=... status=200`
there and forge log lines. This middleware replaces any id that is not 1-128 of `[A-Za-z0-9._:-]` with
a fresh random one before the proxy sees it (the ingress applies the same rule to what it logs and
returns).

Serve loads it from the environment of the Ray nodes (the proxy actor reads it at start):
`RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=cxrfm.serving.proxy:middlewares` (`cxrfm serve` sets it;
on a cluster set it in the Ray pods' environment).
"""

from __future__ import annotations

import re
import uuid

CALLBACK = "cxrfm.serving.proxy:middlewares"
ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


class SanitizeRequestId:
    """ASGI middleware: a bad or repeated x-request-id header becomes one fresh uuid4."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http":
            ids = [v for k, v in scope.get("headers", []) if k.lower() == b"x-request-id"]
            if ids and (len(ids) > 1 or not VALID_REQUEST_ID.fullmatch(ids[0])):
                headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"x-request-id"]
                headers.append((b"x-request-id", uuid.uuid4().hex.encode()))
                scope = {**scope, "headers": headers}
        await self.app(scope, receive, send)


def middlewares() -> list:
    from starlette.middleware import Middleware

    return [Middleware(SanitizeRequestId)]
