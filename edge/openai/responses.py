"""OpenAI response bodies and streaming chunks, built from relay output."""

from __future__ import annotations

from typing import Any

from edge.tools import Arguments, CallStarted, Content, Event, ToolParser
from headrace import __version__
from schemas.events import Done, TokenLogprob

# OpenAI's finish reasons; a job cancelled by someone else reads as a stop.
_FINISH = {"stop": "stop", "length": "length", "cancelled": "stop"}

# OpenAI's backend-configuration marker, as llama.cpp's server sends its build: the
# headrace release that shaped the answer (the models behind it are named in ``model``).
SYSTEM_FINGERPRINT = f"headrace-{__version__}"


def finish_reason(done: Done, parser: ToolParser | None = None) -> str:
    """OpenAI's name for why a choice ended: ``tool_calls`` once it made a complete call."""
    if parser is not None and parser.calls:
        return "tool_calls"
    return _FINISH.get(done.finish_reason, "stop")


def total_usage(dones: list[Done]) -> dict[str, int]:
    """Usage of a request: the prompt counted once, completions summed over choices."""
    prompt = max((d.usage.prompt_tokens for d in dones), default=0)
    completion = sum(d.usage.completion_tokens for d in dones)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def chat_logprobs(items: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """``choices[].logprobs`` of a chat response."""
    if items is None:
        return None
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.token.encode()),
                "top_logprobs": [
                    {"token": a.token, "logprob": a.logprob, "bytes": list(a.token.encode())}
                    for a in t.top_logprobs
                ],
            }
            for t in items
        ]
    }


def completion_logprobs(items: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """``choices[].logprobs`` of a legacy completions response."""
    if items is None:
        return None
    return {
        "tokens": [t.token for t in items],
        "token_logprobs": [t.logprob for t in items],
        "top_logprobs": [{a.token: a.logprob for a in t.top_logprobs} for t in items],
        "text_offset": [],
    }


class ChunkMaker:
    """Streaming chunks of one response: the same ``id`` and ``created`` on every chunk."""

    def __init__(
        self, *, chat: bool, id_: str, created: int, model: str, include_usage: bool
    ) -> None:
        self.chat = chat
        self.base: dict[str, Any] = {
            "id": id_,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
        }
        if include_usage:
            self.base["usage"] = None  # OpenAI: null on every chunk but the usage chunk

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        return {**self.base, "choices": [choice]}

    def role(self, index: int) -> dict[str, Any]:
        """The first chunk of a chat choice."""
        return self._chunk(
            {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
        )

    def text(self, index: int, text: str, logprobs: list[TokenLogprob] | None) -> dict[str, Any]:
        """A content chunk."""
        if self.chat:
            return self._chunk(
                {
                    "index": index,
                    "delta": {"content": text},
                    "logprobs": chat_logprobs(logprobs),
                    "finish_reason": None,
                }
            )
        return self._chunk(
            {
                "index": index,
                "text": text,
                "logprobs": completion_logprobs(logprobs),
                "finish_reason": None,
            }
        )

    def tool_events(self, index: int, events: list[Event]) -> list[dict[str, Any]]:
        """Chunks for what a tool parser found: text, then each call's id and name, then its
        arguments in pieces (``delta.tool_calls[{index, ...}]``, as OpenAI streams them)."""
        chunks = []
        for e in events:
            if isinstance(e, Content):
                chunks.append(self.text(index, e.text, None))
            elif isinstance(e, CallStarted):
                call = {"index": e.index, "id": e.id, "type": "function",
                        "function": {"name": e.name, "arguments": ""}}  # fmt: skip
                chunks.append(self._tool_delta(index, call))
            elif isinstance(e, Arguments) and e.text:
                chunks.append(self._tool_delta(index, {"index": e.index, "function": {"arguments": e.text}}))  # fmt: skip
        return chunks

    def _tool_delta(self, index: int, call: dict[str, Any]) -> dict[str, Any]:
        return self._chunk(
            {
                "index": index,
                "delta": {"tool_calls": [call]},
                "logprobs": None,
                "finish_reason": None,
            }
        )

    def finish(self, index: int, done: Done, parser: ToolParser | None = None) -> dict[str, Any]:
        """The last chunk of a choice, with its finish_reason."""
        if self.chat:
            return self._chunk(
                {
                    "index": index,
                    "delta": {},
                    "logprobs": None,
                    "finish_reason": finish_reason(done, parser),
                }
            )
        return self._chunk(
            {"index": index, "text": "", "logprobs": None, "finish_reason": finish_reason(done)}
        )

    def usage(self, dones: list[Done]) -> dict[str, Any]:
        """The extra chunk sent with ``stream_options.include_usage``."""
        return {**self.base, "choices": [], "usage": total_usage(dones)}


def chat_message(text: str, parser: ToolParser | None) -> dict[str, Any]:
    """``choices[].message``: with ``tool_calls`` when the parser found calls in ``text``
    (which it has been fed whole), the rest of the text as ``content`` (null when blank)."""
    if parser is None or not parser.calls:
        return {"role": "assistant", "content": text, "refusal": None}
    calls = [
        {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
        for c in parser.calls
    ]
    content = parser.text.strip() or None
    return {"role": "assistant", "content": content, "refusal": None, "tool_calls": calls}


def chat_response(
    id_: str, created: int, model: str, texts: list[str], dones: list[Done],
    logprobs: list[list[TokenLogprob] | None], parsers: list[ToolParser | None] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """A whole ``chat.completion`` (``parsers``: each choice's, fed its text, with tools)."""
    parsers = parsers or [None] * len(texts)
    return {
        "id": id_,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {
                "index": i,
                "message": chat_message(text, parser),
                "logprobs": chat_logprobs(lp),
                "finish_reason": finish_reason(done, parser),
            }
            for i, (text, done, lp, parser) in enumerate(
                zip(texts, dones, logprobs, parsers, strict=True)
            )
        ],
        "usage": total_usage(dones),
    }


def completion_response(
    id_: str, created: int, model: str, texts: list[str], dones: list[Done],
    logprobs: list[list[TokenLogprob] | None],
) -> dict[str, Any]:  # fmt: skip
    """A whole ``text_completion``."""
    return {
        "id": id_,
        "object": "text_completion",
        "created": created,
        "model": model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {
                "index": i,
                "text": text,
                "logprobs": completion_logprobs(lp),
                "finish_reason": finish_reason(done),
            }
            for i, (text, done, lp) in enumerate(zip(texts, dones, logprobs, strict=True))
        ],
        "usage": total_usage(dones),
    }
