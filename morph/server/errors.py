"""Errors as OpenAI-compatible servers send them (vLLM's shape).

    {"error": {"message": "...", "type": "BadRequestError", "param": "max_tokens", "code": 400}}

`type` names the kind of failure the way vLLM does (an exception-like name), `code` repeats
the HTTP status, `param` names the offending request field when there is one. Clients
(`openai`, llm, ...) map the status to their own exception classes.
"""

from __future__ import annotations

from starlette.responses import JSONResponse

TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
    415: "UnsupportedMediaTypeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class APIError(Exception):
    """A request the server refuses; becomes one OpenAI-shaped JSON error."""

    def __init__(self, message: str, status: int = 400, param: str | None = None, type: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.type = type or TYPES.get(status, "BadRequestError")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    def response(self, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(message, 400, param)
