"""Function calling at the edge: tools into the prompt and a grammar, tool calls out of the text.

Workers know nothing of tools. A request with tools becomes an ordinary text job:

* **The prompt.** The model's chat template renders the turns as it always does; the tools
  reach the model as a system section written here (``system_section``), and earlier tool
  calls and tool results as text in the convention that section describes, the one Hermes-
  and Qwen-style templates use::

      <tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

  and, for a result, a user turn holding ``<tool_response>...</tool_response>``.
* **The output.** With ``tool_choice`` ``required`` or a named function the job carries a JSON
  Schema (``call_schema``) that the worker turns into a grammar: the model can only write one
  ``{"name": ..., "arguments": {...}}`` object whose arguments match the function's
  parameters. With ``auto`` the model decides, and ``ToolParser`` finds ``<tool_call>`` blocks
  (or an answer that is one bare call object, the Llama 3 style) in what it writes, holding
  back streamed text that may be the start of a block.

The API routes (``edge.routes.openai``, ``edge.routes.ollama``) turn the parser's events into
their own shapes.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import jsonschema
import orjson

from schemas.errors import InvalidRequest
from schemas.jobs import MAX_SCHEMA_DEPTH, ChatMessage, json_depth

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


# What the parser reports, in order.


@dataclass(frozen=True, slots=True)
class Content:
    """Text for the client."""

    text: str


@dataclass(frozen=True, slots=True)
class CallStarted:
    """Call ``index`` begins: its id and name (arguments follow)."""

    index: int
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class Arguments:
    """A piece of call ``index``'s arguments text."""

    index: int
    text: str


@dataclass(frozen=True, slots=True)
class CallDone:
    """Call ``index`` is complete and its arguments parse."""

    index: int
    call: Call


Event = Content | CallStarted | Arguments | CallDone
Mode = Literal["tagged", "forced"]

# The start of a call object as the grammar writes it: name first (call_schema's order), then
# the arguments; the converter's whitespace rule is at most one space.
_FORCED_HEAD = re.compile(
    r'\s*\{\s*"name"\s*:\s*("(?:[^"\\]|\\.)*")\s*,\s*"arguments"\s*:\s*(?=\S)'
)


def _tail(text: str) -> int:
    """Characters at the end of ``text`` that may close the call object rather than its
    arguments: trailing whitespace, and one ``}`` with the whitespace before it."""
    body = text.rstrip()
    if body.endswith("}"):
        body = body[:-1].rstrip()
    return len(text) - len(body)


def _holdback(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could begin ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


@dataclass
class ToolParser:
    """Tool calls out of one choice's text, fed as it streams.

    ``forced``: the text is one call object (the grammar saw to it); its arguments are passed
    on as they arrive. ``tagged``: text with ``<tool_call>`` blocks, or one bare call object as
    the whole answer; a block is reported once it closes and parses (a block that does not
    parse, or names no offered function, stays text).
    """

    names: frozenset[str]
    mode: Mode = "tagged"
    max_calls: int | None = None
    calls: list[Call] = field(default_factory=list, init=False)
    content: list[str] = field(default_factory=list, init=False)
    _buf: str = field(default="", init=False)  # text not yet passed on
    _state: Literal["start", "text", "call", "bare", "forced"] = field(default="start", init=False)
    _scanned: int = field(default=0, init=False)  # call: block searched for its end so far
    _bare: bool = field(default=False, init=False)  # the answer began with ``{"name"``: held
    _found: int = field(default=0, init=False)  # calls found (``calls`` fills as they go out)
    _sent_args: int = field(default=0, init=False)  # forced: arguments passed on
    _forced: CallStarted | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.mode == "forced":
            self._state = "forced"

    def feed(self, text: str) -> list[Event]:
        """The events ``text`` completes."""
        self._buf += text
        events: list[Event] = []
        if self._state == "forced":
            self._forced_step(events, final=False)
        else:
            self._tagged_step(events)
        return self._note(events)

    def finish(self) -> list[Event]:
        """The text ended: what was held back, parsed if it can be."""
        events: list[Event] = []
        if self._state == "forced":
            self._forced_step(events, final=True)
        elif self._state in ("call", "bare"):
            # A block the model did not close (it stopped, or ``</tool_call>`` was a stop
            # string that ended it), or a bare call object: a call if it parses.
            self._finish_block(events, self._buf, raw=(OPEN if self._state == "call" else ""))
        elif self._buf:
            events.append(Content(self._buf))
        self._buf = ""
        return self._note(events)

    def _note(self, events: list[Event]) -> list[Event]:
        for e in events:
            if isinstance(e, Content):
                self.content.append(e.text)
            elif isinstance(e, CallDone):
                self.calls.append(e.call)
        return events

    @property
    def text(self) -> str:
        """The content so far."""
        return "".join(self.content)

    # tagged

    def _tagged_step(self, events: list[Event]) -> None:
        while True:
            if self._state == "start":
                stripped = self._buf.lstrip()
                if not stripped:
                    return
                if stripped[0] == "{" and self._may_be_bare(stripped):
                    self._state = "bare"
                    return
                self._state = "text"
            if self._state == "bare":
                if self._bare:
                    return
                stripped = self._buf.lstrip()
                if not self._may_be_bare(stripped):
                    self._state = "text"
                    continue
                self._bare = stripped[1:].lstrip().startswith('"name"')
                return
            if self._state == "text":
                if not self._text_step(events):
                    return
            elif self._state == "call":
                end = self._buf.find(CLOSE, self._scanned)
                if end < 0:
                    self._scanned = max(0, len(self._buf) - len(CLOSE) + 1)
                    return
                self._scanned = 0
                block, self._buf = self._buf[:end], self._buf[end + len(CLOSE) :]
                self._state = "text"
                self._finish_block(events, block, raw=OPEN, close=CLOSE)

    def _text_step(self, events: list[Event]) -> bool:
        """Pass text on up to a ``<tool_call>``; True when one opened (the block follows)."""
        start = self._buf.find(OPEN) if self._room() else -1
        if start < 0:
            keep = _holdback(self._buf, OPEN) if self._room() else 0
            if len(self._buf) > keep:
                events.append(Content(self._buf[: len(self._buf) - keep]))
                self._buf = self._buf[len(self._buf) - keep :]
            return False
        if start:
            events.append(Content(self._buf[:start]))
        self._buf = self._buf[start + len(OPEN) :]
        self._state = "call"
        return True

    def _room(self) -> bool:
        return self.max_calls is None or self._found < self.max_calls

    @staticmethod
    def _may_be_bare(text: str) -> bool:
        """Whether ``text`` (starting with ``{``) may be the start of ``{"name": ...``."""
        rest = text[1:].lstrip()
        head = '"name"'
        return rest.startswith(head) or head.startswith(rest)

    def _finish_block(self, events: list[Event], block: str, *, raw: str, close: str = "") -> None:
        call = self._parse_call(block)
        if call is None:
            events.append(Content(raw + block + close))
            return
        index, self._found = self._found, self._found + 1
        events += [
            CallStarted(index, call.id, call.name),
            Arguments(index, call.arguments),
            CallDone(index, call),
        ]

    def _parse_call(self, block: str) -> Call | None:
        try:
            obj = orjson.loads(block.strip())
        except orjson.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or obj.get("name") not in self.names:
            return None
        args = obj.get("arguments", obj.get("parameters", {}))  # Llama 3 says parameters
        if isinstance(args, str):  # some models write the arguments as a JSON string
            try:
                args = orjson.loads(args)
            except orjson.JSONDecodeError:
                return None
        if not isinstance(args, dict):
            return None
        return Call(call_id(), str(obj["name"]), orjson.dumps(args).decode())

    # forced

    def _forced_step(self, events: list[Event], *, final: bool) -> None:
        if self._forced is None:
            head = _FORCED_HEAD.match(self._buf)
            if head is None:
                if final and self._buf:
                    events.append(Content(self._buf))  # cut off before the call began
                return
            name = orjson.loads(head.group(1))
            self._forced = CallStarted(0, call_id(), str(name))
            self._buf = self._buf[head.end() :]
            events.append(self._forced)
        upto = len(self._buf) - _tail(self._buf)
        if final and not _is_object(self._buf[:upto]) and _is_object(self._buf.rstrip()):
            upto = len(self._buf.rstrip())  # cut off after the arguments, before the last brace
        if upto > self._sent_args:
            events.append(Arguments(0, self._buf[self._sent_args : upto]))
            self._sent_args = upto
        if final and _is_object(args := self._buf[:upto]):  # else cut off: no call
            events.append(CallDone(0, Call(self._forced.id, self._forced.name, args)))


def _is_object(text: str) -> bool:
    try:
        return isinstance(orjson.loads(text), dict)
    except orjson.JSONDecodeError:
        return False


def parse_all(parser: ToolParser, text: str) -> ToolParser:
    """Feed ``text`` whole (a collected answer) and finish; the parser holds the results."""
    parser.feed(text)
    parser.finish()
    return parser


def names_of(functions: Iterable[Function]) -> frozenset[str]:
    """The names a parser should accept."""
    return frozenset(f.name for f in functions)


Choice = Literal["none", "auto", "required"]


@dataclass(frozen=True, slots=True)
class Plan:
    """What a request's tools mean for its job and its answer.

    ``choice`` is ``none``, ``auto``, ``required``, or the name of the one function to call.
    """

    functions: tuple[Function, ...]
    choice: str = "auto"
    parallel: bool = True

    @classmethod
    def of(
        cls,
        functions: Sequence[Function],
        choice: str | None,
        parallel: bool | None,
        *,
        param: str = "tools",
        choice_param: str = "tool_choice",
    ) -> Plan | None:
        """The checked plan, or None when the request has no tools (and needs none)."""
        check_functions(functions, param)
        if not functions:
            if choice not in (None, "none", "auto"):
                what = "required" if choice == "required" else f"the function '{choice}'"
                raise InvalidRequest(
                    f"tool_choice asks for {what} but the request has no tools", param=choice_param
                )
            return None
        if choice not in (None, "none", "auto", "required") and choice not in names_of(functions):
            raise InvalidRequest(
                f"tool_choice names the function '{choice}', which is not in tools",
                param=choice_param,
            )
        plan = cls(tuple(functions), choice or "auto", True if parallel is None else parallel)
        forced = plan.json_schema()
        if forced is not None and json_depth(forced, MAX_SCHEMA_DEPTH) > MAX_SCHEMA_DEPTH:
            raise InvalidRequest(
                f"the tools' parameters nest too deeply: a required call's schema (the "
                f"parameters inside a name-and-arguments object) may nest at most "
                f"{MAX_SCHEMA_DEPTH} levels",
                param=param,
            )
        return plan

    @property
    def forced(self) -> tuple[Function, ...]:
        """The functions the grammar allows (none unless a call is required)."""
        if self.choice == "required":
            return self.functions
        return tuple(f for f in self.functions if f.name == self.choice)

    def messages(self, turns: Sequence[Turn]) -> list[ChatMessage]:
        """The turns as chat messages, with the tools section unless ``tool_choice`` is none."""
        section = (
            None
            if self.choice == "none"
            else system_section(self.functions, parallel=self.parallel and not self.forced)
        )
        return render(turns, section)

    def json_schema(self) -> dict[str, Any] | None:
        """The schema the output must match: one call, when a call is required."""
        return call_schema(self.forced) if self.forced else None

    def stops(self, stops: Sequence[str], limit: int) -> list[str]:
        """The stop strings: with one call at most, generation ends where that call closes."""
        one_call = self.choice == "auto" and not self.parallel
        if one_call and CLOSE not in stops and len(stops) < limit:
            return [*stops, CLOSE]
        return list(stops)

    def parser(self) -> ToolParser | None:
        """A parser for one choice's text (None with ``tool_choice`` none: all text is prose)."""
        if self.choice == "none":
            return None
        if self.forced:
            return ToolParser(names_of(self.forced), mode="forced")
        return ToolParser(names_of(self.functions), max_calls=None if self.parallel else 1)


def history(turns: Sequence[Turn], plan: Plan | None) -> list[ChatMessage]:
    """Chat messages for a request: through the plan when it has tools, else calls and results
    are still rendered in the ``<tool_call>`` convention (a follow-up turn may carry no tools)."""
    return plan.messages(turns) if plan is not None else render(turns, None)
