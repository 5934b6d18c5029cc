"""The OpenAPI description of routes that parse their bodies themselves."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel


def _inline_refs(node: Any, defs: dict) -> Any:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return _inline_refs({**defs[ref[len("#/$defs/"):]], **rest}, defs)
        return {k: _inline_refs(v, defs) for k, v in node.items() if k != "$defs"}
    if isinstance(node, list):
        return [_inline_refs(v, defs) for v in node]
    return node


def openapi_request_body(model_cls: type[BaseModel], example: dict | None = None) -> dict:
    """``openapi_extra`` for a route that parses its body itself (``parse_request``): the JSON
    body's schema is ``model_cls``'s, with its sub-models inlined (no ``$defs`` left, so the
    operation needs no entries in the document's ``components``). The request models are not
    recursive, so inlining terminates."""
    schema = model_cls.model_json_schema()
    media: dict[str, Any] = {"schema": _inline_refs(schema, schema.get("$defs", {}))}
    if example is not None:
        media["example"] = example
    return {"requestBody": {"required": True, "content": {"application/json": media}}}
