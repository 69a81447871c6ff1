"""OpenAI request bodies with bounds. Unknown fields are ignored, out-of-range values rejected."""

from __future__ import annotations

from typing import Annotated, Any, Literal, cast

from pydantic import BeforeValidator, Field, StrictBool, model_validator

from edge.body import Lenient
from edge.sampling import Grammar, MinP, Penalty, RepeatPenalty, Temperature, TopK, TopP, TypicalP
from edge.tools import MAX_TOOLS, NAME_PATTERN, Call, Function, Plan, Turn, check_history, history
from schemas.errors import InvalidRequest
from schemas.jobs import MAX_MESSAGES, MAX_STOP, SEED_MAX, SchemaDepth, Stops, TextParams


def _not_a_boolean(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("a bias is a number, not a boolean")
    return value


# OpenAI's logit_bias: token ids (decimal strings) to a bias in [-100, 100].
TokenKey = Annotated[str, Field(pattern=r"^[0-9]{1,10}$")]
Bias = Annotated[float, BeforeValidator(_not_a_boolean), Field(ge=-100, le=100)]


class TextPart(Lenient):
    """A content part; only text parts are accepted by text models."""

    type: Literal["text"]
    text: str


class FunctionCall(Lenient):
    """``function`` of a tool call: the arguments are JSON text."""

    name: str = Field(min_length=1, max_length=64)
    arguments: str = Field(default="{}", max_length=1_000_000)


class ToolCall(Lenient):
    """A call an assistant message made."""

    id: str = Field(min_length=1, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(Lenient):
    """One chat message; ``tool`` messages answer an assistant's ``tool_calls``."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _tool_fields(self) -> Message:
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        return self

    def text(self) -> str:
        """The content as plain text (parts concatenated)."""
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    def turn(self) -> Turn:
        """The message as the tools module reads it."""
        calls = tuple(
            Call(c.id, c.function.name, c.function.arguments) for c in self.tool_calls or ()
        )
        return Turn(self.role, self.text(), self.name, calls, self.tool_call_id)


class FunctionDef(Lenient):
    """A function offered to the model: ``parameters`` is a JSON Schema."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str | None = Field(default=None, max_length=100_000)
    parameters: Annotated[dict[str, Any], SchemaDepth] | None = None
    strict: StrictBool | None = None  # a call that is required always matches the schema


class Tool(Lenient):
    """One entry of ``tools``."""

    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Lenient):
    """``tool_choice.function``."""

    name: str = Field(min_length=1, max_length=64)


class NamedToolChoice(Lenient):
    """``tool_choice`` naming the function to call."""

    type: Literal["function"]
    function: NamedFunction


class StreamOptions(Lenient):
    """``stream_options``: only ``include_usage`` means anything here."""

    include_usage: StrictBool = False


class JsonSchemaFormat(Lenient):
    """``response_format.json_schema``."""

    name: str = Field(default="response", max_length=64)
    schema_: Annotated[dict[str, Any], SchemaDepth] = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(Lenient):
    """``response_format``: text, json_object or json_schema."""

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format.json_schema is required when type is json_schema")
        return self


Stop = str | Stops


class Sampling(Lenient):
    """Sampling fields shared by chat and completions, with llama.cpp's extensions."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: Temperature = 1.0
    top_p: TopP = 1.0
    n: int = Field(default=1, ge=1)
    stop: Stop | None = None
    seed: int | None = Field(default=None, ge=0, le=SEED_MAX)
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: Annotated[dict[TokenKey, Bias], Field(max_length=1024)] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    # llama.cpp extensions
    top_k: TopK = 40
    min_p: MinP = 0.05
    typical_p: TypicalP = 1.0
    repeat_penalty: RepeatPenalty = 1.0
    grammar: Grammar | None = None
    ignore_eos: StrictBool = False  # benchmark clients send it to get exactly max_tokens tokens

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> Sampling:
        # OpenAI answers 400 for stream_options without stream.
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    def stops(self) -> list[str]:
        """``stop`` as a list."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        """Whether a final usage chunk was asked for."""
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(Sampling):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def token_limit(self) -> int | None:
        """``max_completion_tokens`` wins over the older ``max_tokens``."""
        return self.max_completion_tokens or self.max_tokens

    def tool_plan(self) -> Plan | None:
        """What ``tools`` and ``tool_choice`` ask for, checked; None without tools."""
        functions = [
            Function(t.function.name, t.function.description, t.function.parameters)
            for t in self.tools or ()
        ]
        choice = self.tool_choice
        named = choice.function.name if isinstance(choice, NamedToolChoice) else choice
        plan = Plan.of(functions, named, self.parallel_tool_calls)
        check_history(self.turns(), "messages")
        fmt = self.response_format
        if plan is not None and plan.forced:
            if fmt is not None and fmt.type != "text":
                raise InvalidRequest(
                    "a required tool call cannot also follow a JSON response_format",
                    param="tool_choice",
                )
            if self.grammar:
                raise InvalidRequest(
                    "a required tool call cannot also follow a grammar", param="tool_choice"
                )
        return plan

    def turns(self) -> list[Turn]:
        """The messages as the tools modules read them."""
        return [m.turn() for m in self.messages]

    def job_params(
        self, seed: int, plan: Plan | None = None, prompt: str | None = None
    ) -> TextParams:
        """The job parameters of one choice, generated with ``seed`` (tools as ``plan`` says);
        ``prompt``: the turns already rendered by the model's template (with its tools)."""
        fmt = self.response_format or ResponseFormat()
        schema = fmt.json_schema.schema_ if fmt.type != "text" and fmt.json_schema else None
        forced = plan.json_schema() if plan is not None else None
        stops = plan.stops(self.stops(), MAX_STOP) if plan is not None else self.stops()
        return TextParams(
            messages=history(self.turns(), plan) if prompt is None else None,
            prompt=prompt,
            max_tokens=self.token_limit(),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            typical_p=self.typical_p,
            repeat_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=seed,
            stop=stops,
            logit_bias=self.logit_bias or {},
            logprobs=self.logprobs,
            top_logprobs=self.top_logprobs,
            grammar=self.grammar,
            json_schema=forced or schema,
            response_format="json_schema" if forced else fmt.type,
            ignore_eos=self.ignore_eos,
        )


class CompletionRequest(Sampling):
    """``POST /v1/completions``: one prompt, as text or token ids."""

    prompt: str | list[int] | list[str]
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for completions
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: StrictBool = False
    best_of: int | None = Field(default=None, ge=1, le=1)

    @model_validator(mode="after")
    def _one_prompt(self) -> CompletionRequest:
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str):
            if len(self.prompt) != 1:
                raise ValueError("send one prompt per request (batched prompts are not supported)")
            self.prompt = self.prompt[0]
        if self.echo:
            raise ValueError("echo is not supported")
        return self

    def text_or_tokens(self) -> str | list[int]:
        """The prompt as validated: text, or token ids."""
        if isinstance(self.prompt, str):
            return self.prompt
        # _one_prompt turned a one-string list into the string, and a list of several strings
        # is refused, so a list left here is token ids (``[]`` validates as list[int] first).
        return cast("list[int]", self.prompt)

    def job_params(self, seed: int) -> TextParams:
        """The job parameters of one choice, generated with ``seed``."""
        return TextParams(
            prompt=self.text_or_tokens(),
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            typical_p=self.typical_p,
            repeat_penalty=self.repeat_penalty,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            seed=seed,
            stop=self.stops(),
            logit_bias=self.logit_bias or {},
            logprobs=self.logprobs is not None,
            top_logprobs=self.logprobs,
            grammar=self.grammar,
            ignore_eos=self.ignore_eos,
        )
