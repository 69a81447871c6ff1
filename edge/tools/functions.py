"""The functions a request offers, the calls a model makes, and the turns that carry them."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
import orjson

from schemas.errors import InvalidRequest

OPEN, CLOSE = "<tool_call>", "</tool_call>"
# OpenAI's rule for function names.
NAME_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
MAX_TOOLS = 128  # as OpenAI
_EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


@dataclass(frozen=True, slots=True)
class Function:
    """One function a request offers the model."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None

    def schema(self) -> dict[str, Any]:
        """Its parameters' JSON Schema (no parameters: an empty object)."""
        return self.parameters if self.parameters is not None else _EMPTY_PARAMETERS

    def spec(self) -> dict[str, Any]:
        """As the tools section lists it (OpenAI's tool object)."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description:
            fn["description"] = self.description
        fn["parameters"] = self.schema()
        return {"type": "function", "function": fn}


@dataclass(frozen=True, slots=True)
class Call:
    """A tool call: in a history turn, or parsed from the model's text."""

    id: str
    name: str
    arguments: str  # JSON text, as OpenAI carries it

    def arguments_object(self) -> Any:
        """The arguments parsed (Ollama's shape); text that is not JSON stays a string."""
        try:
            return orjson.loads(self.arguments)
        except orjson.JSONDecodeError:
            return self.arguments


@dataclass(frozen=True, slots=True)
class Turn:
    """One chat turn, whatever the API: text, the calls an assistant made, or a tool's result."""

    role: str
    content: str = ""
    name: str | None = None
    calls: tuple[Call, ...] = ()
    tool_call_id: str | None = None


def call_id() -> str:
    """A fresh tool call id, in OpenAI's ``call_...`` form."""
    return "call_" + secrets.token_hex(12)


def check_functions(functions: Sequence[Function], param: str) -> None:
    """400 unless every function has a unique name and parameters that are a valid JSON Schema.

    The schema is checked against its metaschema (draft 2020-12, or the one its ``$schema``
    names); the grammar converter on the worker may still refuse a valid one it cannot express.
    """
    seen: set[str] = set()
    for i, f in enumerate(functions):
        if f.name in seen:
            raise InvalidRequest(
                f"two tools are named '{f.name}'", param=f"{param}.{i}.function.name"
            )
        seen.add(f.name)
        _check_schema(f, f"{param}.{i}.function.parameters")


def _check_schema(f: Function, where: str) -> None:
    schema = f.schema()
    if not isinstance(schema.get("$schema", ""), str):
        raise InvalidRequest("$schema must be a string (a metaschema's URI)", param=where)
    validator = jsonschema.validators.validator_for(schema, jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        at = "/".join(map(str, e.absolute_path)) or "(root)"
        raise InvalidRequest(
            f"the parameters of tool '{f.name}' are not a valid JSON Schema: "
            f"{e.message[:200]} (at {at})",
            param=where,
        ) from None
    if schema.get("type", "object") != "object":
        raise InvalidRequest(
            f"the parameters of tool '{f.name}' must describe an object", param=where
        )


def call_schema(functions: Sequence[Function]) -> dict[str, Any]:
    """The JSON Schema of one call to any of ``functions``: name first, then the arguments."""
    alternatives = [
        {
            "type": "object",
            "properties": {"name": {"const": f.name}, "arguments": f.schema()},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


def check_history(turns: Sequence[Turn], param: str) -> None:
    """400 for a tool result that answers no earlier call (OpenAI refuses those too)."""
    ids: set[str] = set()
    for i, t in enumerate(turns):
        ids.update(c.id for c in t.calls)
        if t.role == "tool" and t.tool_call_id is not None and t.tool_call_id not in ids:
            raise InvalidRequest(
                f"the tool message's tool_call_id '{t.tool_call_id[:64]}' answers no tool call "
                "of an earlier assistant message",
                param=f"{param}.{i}.tool_call_id",
            )


def names_of(functions: Iterable[Function]) -> frozenset[str]:
    """The names a parser should accept."""
    return frozenset(f.name for f in functions)
