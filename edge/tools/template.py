"""A model's own tool syntax: its chat template, rendered at the edge with the request's tools.

Workers render chat turns with the template in their GGUF and know nothing of tools. When
that template has a tools section of its own (Qwen 2.5, Hermes, Llama 3.1 and most recent
instruct models reference ``tools``), a request with tools is better served in the syntax the
model was trained on: the edge asks a worker for the template (``rpc.llm.<model>.props``),
renders the turns and the tools with it here, as Hugging Face's ``apply_chat_template`` would
(a sandboxed Jinja environment, its ``tojson``, ``raise_exception`` and ``strftime_now``), and
sends the text as the job's prompt. A template without one (SmolLM2's) leaves the turns to the
worker, with the tools in the ``<tool_call>`` convention of ``edge.tools.prompt``.

The template is asked for on every request that offers tools: one request/reply to any worker
of the model, answered from memory.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from aiohttp import web
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge import rpc
from edge.tools import Function, Turn
from schemas.errors import InvalidRequest

# A template that reads the ``tools`` variable renders them itself.
_USES_TOOLS = re.compile(r"\btools\b")


@dataclass(frozen=True, slots=True)
class Template:
    """A model's chat template and the special tokens it is rendered with."""

    source: str
    bos: str = ""
    eos: str = ""

    @property
    def has_tools(self) -> bool:
        """Whether the template writes a tools section of its own."""
        return bool(_USES_TOOLS.search(self.source))


async def fetch(request: web.Request, model: str) -> Template | None:
    """The model's template, from any of its workers (None for a model that reports none,
    such as the echo engine). The caller must be allowed the model: it is checked first."""
    model = await rpc.default_model(request, model)  # the key's check, and a live worker
    props = await rpc.call(request, model, "props", {})
    source = props.get("chat_template")
    if not isinstance(source, str) or not source:
        return None
    return Template(source, str(props.get("bos_token") or ""), str(props.get("eos_token") or ""))


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    """Hugging Face's ``tojson``: no HTML escaping (Jinja's own would write ``\\u003c``)."""
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        loader=jinja2.BaseLoader(),
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda f: datetime.now().strftime(f)
    return env


_ENV = _environment()


def _message(t: Turn) -> dict[str, Any]:
    """A turn as templates read messages: calls with their arguments as objects."""
    m: dict[str, Any] = {"role": t.role, "content": t.content}
    if t.name:
        m["name"] = t.name
    if t.calls:
        m["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": c.name, "arguments": c.arguments_object()},
            }
            for c in t.calls
        ]
    if t.tool_call_id is not None:
        m["tool_call_id"] = t.tool_call_id
    return m


async def prompt(
    request: web.Request,
    model: str,
    template: Template,
    turns: Sequence[Turn],
    functions: Sequence[Function],
) -> str:
    """The job's prompt: ``render``, without a leading BOS the template writes when the
    model's tokenizer adds one itself (a worker tokenizes a prompt with its special tokens;
    SmolLM2's BOS is ``<|im_start|>`` and its tokenizer adds none, Llama 3's adds one)."""
    text = render(template, turns, functions)
    if template.bos and text.startswith(template.bos):
        empty = await rpc.call(request, model, "tokenize", {"content": "", "add_special": True})
        if empty.get("tokens"):
            text = text[len(template.bos) :]
    return text


def render(template: Template, turns: Sequence[Turn], functions: Sequence[Function]) -> str:
    """The prompt the template makes of the turns and tools (400 if the template refuses)."""
    calls_by_id = {c.id: c.name for t in turns for c in t.calls}
    messages = [_message(t) for t in turns]
    for m in messages:  # some templates name the function a result came from
        if m["role"] == "tool" and "name" not in m and m.get("tool_call_id") in calls_by_id:
            m["name"] = calls_by_id[m["tool_call_id"]]
    try:
        text = _ENV.from_string(template.source).render(
            messages=messages,
            tools=[f.spec() for f in functions],
            add_generation_prompt=True,
            bos_token=template.bos,
            eos_token=template.eos,
        )
    except (jinja2.TemplateError, ValueError, TypeError) as e:
        raise InvalidRequest(
            f"the chat template refused the messages ({type(e).__name__}: {str(e)[:200]})",
            param="messages",
        ) from None
    return str(text)
