"""`APIError`: the OpenAI-shaped error every part of the server raises (re-exported by `llmkit.serve.protocol`).

It lives in its own module so that the request helpers `protocol` calls into (tool calling, structured
output) can raise it without importing `protocol` back (tests/test_import_graph.py forbids import cycles).
"""

from __future__ import annotations


class APIError(Exception):
    """An error answered as an OpenAI-style JSON body with HTTP `status`."""

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 code: str | None = None, type: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type = message, param, status, code, type
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
