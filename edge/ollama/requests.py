"""``/api/chat`` and ``/api/generate`` bodies; ``stream`` defaults to true, as in Ollama."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import orjson
from pydantic import Field, StrictBool

from edge.body import Lenient
from edge.openai.requests import Tool
from edge.sampling import (
    MinP,
    MirostatRate,
    Penalty,
    RepeatLastN,
    RepeatPenalty,
    Temperature,
    TopK,
    TopP,
    TypicalP,
)
from edge.tools import MAX_TOOLS, Call, Function, Plan, Turn, call_id, history
from schemas.errors import InvalidRequest
from schemas.jobs import MAX_MESSAGES, SEED_MAX, ChatMessage, SchemaDepth, Stops, TextParams


class Options(Lenient):
    """The sampling ``options`` Ollama clients send (llama.cpp's names)."""

    temperature: Temperature = 0.8
    top_p: TopP = 0.9
    top_k: TopK = 40
    min_p: MinP = 0.0
    typical_p: TypicalP = 1.0
    repeat_penalty: RepeatPenalty = 1.1
    repeat_last_n: RepeatLastN = 64
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    mirostat: Literal[0, 1, 2] = 0
    mirostat_tau: MirostatRate = 5.0
    mirostat_eta: MirostatRate = 0.1
    seed: int | None = Field(default=None, ge=-1, le=SEED_MAX)
    stop: Stops = []
    num_predict: int = Field(default=-1, ge=-2)

    def asked_seed(self) -> int | None:
        """The seed asked for, or None for a random one (unset or -1)."""
        return None if self.seed in (None, -1) else self.seed

    def token_limit(self) -> int | None:
        """``num_predict`` as a token limit: None for no limit (negative, or 0)."""
        return None if self.num_predict < 0 else (self.num_predict or None)


class CalledFunction(Lenient):
    """``function`` of a tool call in Ollama's shape: the arguments are an object."""

    name: str = Field(min_length=1, max_length=64)
    arguments: Annotated[dict[str, Any], SchemaDepth] = {}


class ToolCall(Lenient):
    """A call an assistant message made."""

    function: CalledFunction


class Message(Lenient):
    """One chat message; a ``tool`` message carries a result (``tool_name`` says whose)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = ""
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None
    tool_name: str | None = Field(default=None, max_length=64)

    def turn(self) -> Turn:
        """The message as the tools module reads it (Ollama's calls have no ids: made here)."""
        calls = tuple(
            Call(call_id(), c.function.name, orjson.dumps(c.function.arguments).decode())
            for c in self.tool_calls or ()
        )
        return Turn(self.role, self.content or "", self.tool_name, calls)


class Common(Lenient):
    """Fields of both routes."""

    model: str = Field(min_length=1, max_length=256)
    stream: StrictBool = True
    format: Annotated[Literal["json"] | dict[str, Any] | None, SchemaDepth] = None
    options: Options = Options()

    def _params(
        self, seed: int, *, messages: list[ChatMessage] | None = None, prompt: str | None = None
    ) -> TextParams:
        """The job parameters for ``messages`` or a raw ``prompt``, generated with ``seed``."""
        o, fmt = self.options, self.format
        return TextParams(
            messages=messages,
            prompt=prompt,
            max_tokens=o.token_limit(),
            temperature=o.temperature,
            top_p=o.top_p,
            top_k=o.top_k,
            min_p=o.min_p,
            typical_p=o.typical_p,
            repeat_penalty=o.repeat_penalty,
            repeat_last_n=o.repeat_last_n,
            presence_penalty=o.presence_penalty,
            frequency_penalty=o.frequency_penalty,
            mirostat=o.mirostat,
            mirostat_tau=o.mirostat_tau,
            mirostat_eta=o.mirostat_eta,
            seed=seed,
            stop=o.stop,
            response_format="json_object"
            if fmt == "json"
            else ("json_schema" if isinstance(fmt, dict) else "text"),
            json_schema=fmt if isinstance(fmt, dict) else None,
        )


class ChatRequest(Common):
    """``POST /api/chat``; with ``tools`` the model may call them (Ollama has no tool_choice)."""

    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    keep_alive: str | float | None = None  # accepted; workers keep their model loaded anyway

    def tool_plan(self) -> Plan | None:
        """The checked tools, or None without them."""
        functions = [
            Function(t.function.name, t.function.description, t.function.parameters)
            for t in self.tools or ()
        ]
        return Plan.of(functions, None, None)

    def turns(self) -> list[Turn]:
        """The messages as the tools modules read them."""
        return [m.turn() for m in self.messages]

    def job_params(
        self, seed: int, plan: Plan | None = None, prompt: str | None = None
    ) -> TextParams:
        """The job parameters, generated with ``seed``; ``prompt``: the turns already rendered
        by the model's template (with its tools)."""
        if prompt is not None:
            return self._params(seed, prompt=prompt)
        return self._params(seed, messages=history(self.turns(), plan))


class GenerateRequest(Common):
    """``POST /api/generate``: the prompt goes through the model's template unless ``raw``."""

    prompt: str
    system: str | None = None
    raw: StrictBool = False
    keep_alive: str | float | None = None  # accepted; workers keep their model loaded anyway

    def job_params(self, seed: int) -> TextParams:
        """The job parameters, generated with ``seed``: a ``raw`` prompt as is, else the prompt
        (after ``system``, if any) as chat turns for the model's template."""
        if self.raw:
            return self._params(seed, prompt=self.prompt)
        system = [ChatMessage(role="system", content=self.system)] if self.system else []
        user = ChatMessage(role="user", content=self.prompt)
        return self._params(seed, messages=[*system, user])


class ShowRequest(Lenient):
    """``POST /api/show``: ``model``, or ``name`` as older clients send it."""

    model: str | None = Field(default=None, max_length=256)
    name: str | None = Field(default=None, max_length=256)
    verbose: StrictBool = False

    def asked(self) -> str:
        """The model asked about; none is a 400, as in Ollama."""
        asked = self.model or self.name
        if not asked:
            raise InvalidRequest("model is required", param="model")
        return asked
