"""The request/reply operations of a text model (``rpc.llm.<model>.<op>``), in llama.cpp's shapes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pydantic import ConfigDict, TypeAdapter, ValidationError

from schemas.errors import InvalidRequest
from schemas.jobs import MAX_MESSAGES, MAX_PROMPT_CHARS, ChatMessage
from workers.engines.gguf import GgufModel


class _TemplateMessage(ChatMessage):
    """A message as ``apply-template`` takes it from a client: fields other than ours ignored.

    In a job a ChatMessage forbids unknown fields, but this operation is a client surface
    (llama.cpp's /apply-template) and has always ignored them (``tool_call_id`` ...).
    """

    model_config = ConfigDict(extra="ignore")


_MESSAGES = TypeAdapter(list[_TemplateMessage])


def _field(payload: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = payload.get(name, default)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise InvalidRequest(f"{name} must be of type {kind.__name__}", param=name)
    return value


def tokenize(model: GgufModel, payload: dict[str, Any]) -> dict[str, Any]:
    """``{content, add_special?, parse_special?, with_pieces?}`` -> ``{tokens}`` (llama.cpp's /tokenize)."""
    content: str = _field(payload, "content", str)
    if len(content) > MAX_PROMPT_CHARS:
        raise InvalidRequest(f"content is longer than {MAX_PROMPT_CHARS} characters")
    tokens = model.tokenize(
        content,
        add_special=_field(payload, "add_special", bool, False),
        parse_special=_field(payload, "parse_special", bool, True),
    )
    if not _field(payload, "with_pieces", bool, False):
        return {"tokens": tokens}
    return {"tokens": [{"id": t, "piece": _piece(model.piece(t, special=True))} for t in tokens]}


def _piece(data: bytes) -> str | list[int]:
    """A piece as text, or as its bytes when it is part of a UTF-8 character (as llama.cpp does)."""
    try:
        return data.decode()
    except UnicodeDecodeError:
        return list(data)


def detokenize(model: GgufModel, payload: dict[str, Any]) -> dict[str, Any]:
    """``{tokens}`` -> ``{content}``."""
    tokens = _field(payload, "tokens", list, [])
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise InvalidRequest("tokens must be a list of integers", param="tokens")
    return {"content": model.detokenize(tokens)}


def apply_template(model: GgufModel, payload: dict[str, Any]) -> dict[str, Any]:
    """``{messages}`` -> ``{prompt}``: the model's chat template applied, generation prompt added."""
    raw = _field(payload, "messages", list)
    if len(raw) > MAX_MESSAGES:
        raise InvalidRequest(f"more than {MAX_MESSAGES} messages", param="messages")
    try:
        messages = _MESSAGES.validate_python(raw)
    except ValidationError as e:
        raise InvalidRequest(
            f"messages are malformed ({e.error_count()} error(s))", param="messages"
        ) from None
    return {"prompt": model.render(messages)}


def props(model: GgufModel, payload: dict[str, Any]) -> dict[str, Any]:
    """The model's properties (llama.cpp's /props)."""
    return model.props()


OPS: dict[str, Callable[[GgufModel, dict[str, Any]], dict[str, Any]]] = {
    "tokenize": tokenize,
    "detokenize": detokenize,
    "apply-template": apply_template,
    "props": props,
}


def answer(model: GgufModel, op: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Run one operation; unknown operations and bad input raise InvalidRequest."""
    handler = OPS.get(op)
    if handler is None:
        raise InvalidRequest(f"unknown operation {op[:64]!r}; one of {', '.join(OPS)}")
    if not isinstance(payload, dict):
        raise InvalidRequest("the payload must be a JSON object")
    return handler(model, payload)
