"""`ApiKeyMiddleware`: with --api-key (or $RETRAIN_API_KEY), every endpoint but /healthz needs it."""

from __future__ import annotations

import base64
import hmac

from retrain.serve.http_errors import error_body


class ApiKeyMiddleware:
    """Every request but GET /healthz needs the key: `Authorization: Bearer KEY`,
    `X-API-Key: KEY`, or HTTP Basic auth with KEY as the password (what a browser sends after
    its login prompt, so the web page works behind the key too)."""

    def __init__(self, app, key: str):
        self.app = app
        self.key = key.encode()

    def _given(self, headers: dict) -> list[bytes]:
        out = []
        if b"x-api-key" in headers:
            out.append(headers[b"x-api-key"].strip())
        auth = headers.get(b"authorization", b"")
        scheme, _, value = auth.partition(b" ")
        if scheme.lower() == b"bearer":
            out.append(value.strip())
        elif scheme.lower() == b"basic":
            try:
                out.append(base64.b64decode(value.strip(), validate=True).partition(b":")[2])
            except ValueError:
                pass
        return out

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] == "/healthz":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if any(hmac.compare_digest(k, self.key) for k in self._given(headers)):
            return await self.app(scope, receive, send)
        from starlette.responses import JSONResponse

        given = bool(self._given(headers))
        msg = ("the API key is wrong" if given else "this server needs an API key") + \
            ": send `Authorization: Bearer KEY` or `X-API-Key: KEY` (a browser asks for it as the password)"
        resp = JSONResponse(error_body("unauthorized", msg), status_code=401,
                            headers={"WWW-Authenticate": 'Basic realm="retrain", charset="UTF-8"'})
        await resp(scope, receive, send)
