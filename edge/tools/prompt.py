"""The tools as the model reads them when its template has no tools section: a system section,
and earlier calls and results in the ``<tool_call>`` convention."""

from __future__ import annotations

from collections.abc import Sequence

import orjson

from edge.tools.functions import CLOSE, OPEN, Call, Function, Turn
from schemas.jobs import ChatMessage


def system_section(functions: Sequence[Function], *, parallel: bool) -> str:
    """The text that tells the model about its tools and how to call them."""
    listed = "\n".join(orjson.dumps(f.spec()).decode() for f in functions)
    how_many = (
        "You may call one or more functions" if parallel else "You may call at most one function"
    )
    return (
        "# Tools\n\n"
        f"{how_many} to help with the user's request. The functions are described below, "
        "one JSON Schema per line, inside <tools></tools>:\n"
        f"<tools>\n{listed}\n</tools>\n\n"
        "To call a function, answer with a JSON object holding its name and its arguments "
        "inside <tool_call></tool_call> tags:\n"
        '<tool_call>\n{"name": <function name>, "arguments": <arguments as a JSON object>}\n'
        "</tool_call>\n"
        "Results come back inside <tool_response></tool_response> tags."
    )


def _call_text(c: Call) -> str:
    args = c.arguments_object()
    body = orjson.dumps({"name": c.name, "arguments": args}).decode()
    return f"{OPEN}\n{body}\n{CLOSE}"


def render(turns: Sequence[Turn], section: str | None) -> list[ChatMessage]:
    """Chat messages for the model's template: ``section`` joined to the system prompt (one is
    added first when there is none), calls and results in the ``<tool_call>`` convention.

    Consecutive tool results become one user turn (as Qwen's template does), so templates that
    insist on alternating turns accept them.
    """
    out: list[ChatMessage] = []
    results: list[str] = []

    def flush() -> None:
        if results:
            out.append(ChatMessage(role="user", content="\n".join(results)))
            results.clear()

    for t in turns:
        if t.role == "tool":
            results.append(f"<tool_response>\n{t.content}\n</tool_response>")
            continue
        flush()
        content = t.content
        if t.calls:
            content = "\n".join([*([content] if content else []), *map(_call_text, t.calls)])
        out.append(ChatMessage(role=t.role, content=content, name=t.name))
    flush()
    if section is not None:
        if out and out[0].role in ("system", "developer"):
            first = out[0]
            joined = f"{first.content}\n\n{section}" if first.content else section
            out[0] = ChatMessage(role="system", content=joined, name=first.name)
        else:
            out.insert(0, ChatMessage(role="system", content=section))
    return out
