"""OpenAI-shaped errors: :class:`APIError` (status, message, ``param``) and the mapping of
pydantic validation errors to a 400 naming the first offending field."""
from __future__ import annotations

from pydantic import ValidationError


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 405: "invalid_request_error", 413: "invalid_request_error",
                500: "internal_server_error", 503: "service_unavailable"}


class APIError(Exception):
    """An error that the server turns into an OpenAI-shaped JSON body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str | None = None, code: str | int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type or _ERROR_TYPES.get(status, "invalid_request_error")
        self.code = code if code is not None else status

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None) -> APIError:
    """A 400 ``invalid_request_error`` naming ``param``."""
    return APIError(400, message, param=param)


# pydantic error type of a failed ``Field`` bound -> (operator, ctx key)
_BOUND_ERRORS = {"greater_than_equal": (">=", "ge"), "less_than_equal": ("<=", "le"),
                 "greater_than": (">", "gt"), "less_than": ("<", "lt")}


def validation_error_to_api_error(err: ValidationError) -> APIError:
    """Map a pydantic error to a 400 naming the first offending field."""
    first = err.errors(include_url=False)[0]
    loc = [str(p) for p in first.get("loc", ()) if not str(p).startswith(("function-", "union["))]
    # pydantic appends the union member type (e.g. 'str', 'list[int]') to the location
    # of union fields; keep the request-level path only.
    clean: list[str] = []
    for p in loc:
        if p in ("str", "int", "float", "bool") or p.startswith(("list[", "dict[", "tagged-union")):
            break
        clean.append(p)
    param = ".".join(clean) or None
    bound = _BOUND_ERRORS.get(first.get("type", ""))
    if bound is not None and param:  # same wording as the hand-written checks: 'n must be >= 1, got 0'
        limit = first["ctx"][bound[1]]
        limit = int(limit) if isinstance(limit, float) and limit.is_integer() else limit
        return invalid(f"{param} must be {bound[0]} {limit}, got {first.get('input')}", param=param)
    if first.get("type") == "extra_forbidden":
        return invalid(f"{param}: this server does not support this field (it is not ignored silently)",
                       param=param)
    msg = first.get("msg", "invalid value")
    return invalid(f"{param}: {msg}" if param else msg, param=param)


