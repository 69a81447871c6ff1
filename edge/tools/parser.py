"""Tool calls out of a model's text, as it streams: ``<tool_call>`` blocks, a bare call
object, or the one call a grammar held the text to."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import orjson

from edge.tools.functions import CLOSE, OPEN, Call, call_id


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
