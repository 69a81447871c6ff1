"""Tool calling at the edge: the ``<tool_call>`` parser on crafted model text, the prompt and
grammar a request's tools become, and bad tool requests refused in each route's error shape
through the openai SDK and the ollama client, unchanged, against the real edge and an echo
worker. (Calls made by a real model: tests/test_tools_llama.py.)"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import jsonschema
import openai
import orjson
import pytest
from nats.aio.client import Client as NATS

from edge.openai.requests import ChatCompletionRequest
from edge.tools import (
    CLOSE,
    Arguments,
    Call,
    CallDone,
    CallStarted,
    Content,
    Event,
    Function,
    Plan,
    ToolParser,
    Turn,
    call_schema,
    render,
)
from schemas.codec import decode_job
from schemas.errors import InvalidRequest
from schemas.jobs import TextJob
from schemas.subjects import job_subject
from tests.conftest import API_KEY, running
from workers.settings import WorkerSettings

NAMES = frozenset({"get_weather", "get_time"})
WEATHER = Function(
    "get_weather",
    "The weather in a city.",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)
TOOL = {"type": "function", "function": {"name": WEATHER.name, "parameters": WEATHER.parameters}}


def fed(parser: ToolParser, text: str, size: int) -> list[Event]:
    """The parser's events for ``text`` streamed in pieces of ``size`` characters."""
    events: list[Event] = []
    for i in range(0, len(text), size):
        events += parser.feed(text[i : i + size])
    return events + parser.finish()


def content(events: list[Event]) -> str:
    return "".join(e.text for e in events if isinstance(e, Content))


@pytest.mark.parametrize("size", [*range(1, 12), 1000])
def test_tagged_calls_are_found_in_any_split(size: int) -> None:
    text = (
        "Checking both.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>{"name": "get_time", "arguments": "{\\"zone\\": \\"UTC\\"}"}</tool_call>'
    )
    parser = ToolParser(NAMES)
    events = fed(parser, text, size)
    assert content(events).strip() == "Checking both."
    assert "<" not in content(events)  # nothing of a block leaked as text
    assert [(c.name, orjson.loads(c.arguments)) for c in parser.calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "UTC"}),  # arguments written as a JSON string are taken too
    ]
    starts = [e for e in events if isinstance(e, CallStarted)]
    assert [s.index for s in starts] == [0, 1]
    assert len({s.id for s in starts}) == 2


@pytest.mark.parametrize(
    "text",
    [
        "<tool_call>not json</tool_call>",
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',  # not an offered tool
        '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',
        "a < b, and <tool_ is not a tag",
        '{"answer": 42}',  # JSON that is no call stays text
    ],
)
def test_what_is_no_call_stays_text(text: str) -> None:
    parser = ToolParser(NAMES)
    assert content(fed(parser, text, 2)) == text
    assert parser.calls == []


def test_an_unclosed_block_at_the_end_is_a_call() -> None:
    # With parallel_tool_calls false, </tool_call> is a stop string: the text ends before it.
    parser = ToolParser(NAMES, max_calls=1)
    fed(parser, '<tool_call>\n{"name": "get_time", "arguments": {}}\n', 4)
    assert [c.name for c in parser.calls] == ["get_time"]


def test_one_call_at_most_when_parallel_calls_are_off() -> None:
    block = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    parser = ToolParser(NAMES, max_calls=1)
    events = fed(parser, block + block, 5)
    assert len(parser.calls) == 1
    assert content(events) == block  # past the limit a block is text


def test_a_bare_call_object_as_the_whole_answer() -> None:
    parser = ToolParser(NAMES)
    fed(parser, ' {"name": "get_weather", "parameters": {"city": "Oslo"}}', 6)
    (call,) = parser.calls
    assert orjson.loads(call.arguments) == {"city": "Oslo"}  # Llama 3 writes "parameters"


@pytest.mark.parametrize("size", [*range(1, 12), 1000])
def test_forced_arguments_stream_in_pieces_that_join_to_json(size: int) -> None:
    text = '{ "name": "get_weather", "arguments": {"city": "Paris", "x": {"y": [1, 2]}} } '
    parser = ToolParser(NAMES, mode="forced")
    events = fed(parser, text, size)
    assert isinstance(events[0], CallStarted)
    assert events[0].name == "get_weather"
    pieces = [e.text for e in events if isinstance(e, Arguments)]
    assert orjson.loads("".join(pieces)) == {"city": "Paris", "x": {"y": [1, 2]}}
    assert isinstance(events[-1], CallDone)
    assert events[-1].call.arguments == "".join(pieces)
    if size == 1:
        assert len(pieces) > 10  # passed on as the model wrote them, not at the end


def test_forced_call_cut_off_is_no_call() -> None:
    parser = ToolParser(NAMES, mode="forced")
    events = fed(parser, '{"name": "get_weather", "arguments": {"city": "Pa', 3)
    assert parser.calls == []  # so finish_reason stays "length"
    assert "".join(e.text for e in events if isinstance(e, Arguments)) == '{"city": "Pa'


def test_forced_call_cut_off_before_its_last_brace_is_a_call() -> None:
    parser = ToolParser(NAMES, mode="forced")
    events = fed(parser, '{"name": "get_time", "arguments": {"zone": "UTC"}', 4)
    (call,) = parser.calls
    assert call.arguments == '{"zone": "UTC"}'
    assert "".join(e.text for e in events if isinstance(e, Arguments)) == call.arguments


def test_long_calls_fed_a_character_at_a_time() -> None:
    parser = ToolParser(NAMES, mode="forced")
    parser.feed('{"name": "get_time", "arguments": {"zone": "')
    for _ in range(20_000):
        parser.feed("a")
    parser.feed('"} }')
    parser.finish()
    assert len(parser.calls) == 1
    bare = ToolParser(NAMES)
    bare.feed('{"name": "get_time", "arguments": {"zone": "')
    for _ in range(20_000):
        bare.feed("a")
    bare.feed('"}}')
    bare.finish()
    assert len(bare.calls) == 1


def test_call_schema_accepts_exactly_the_offered_calls() -> None:
    other = Function("get_time", None, None)  # no parameters: an empty object
    schema = call_schema([WEATHER, other])
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Rome"}}, schema)
    jsonschema.validate({"name": "get_time", "arguments": {}}, schema)
    for wrong in (
        {"name": "get_weather", "arguments": {}},
        {"name": "get_date", "arguments": {}},
        {"name": "get_time"},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(wrong, schema)


def test_history_renders_calls_results_and_the_tools_section() -> None:
    plan = Plan.of([WEATHER], "auto", False)
    assert plan is not None
    call = '{"city": "Paris"}'
    turns = [
        Turn("system", "Be brief."),
        Turn("user", "Weather?"),
        Turn("assistant", "", calls=(Call("call_1", "get_weather", call),)),
        Turn("tool", "18C", tool_call_id="call_1"),
        Turn("tool", "sunny", tool_call_id="call_1"),
    ]
    messages = plan.messages(turns)
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[0].content.startswith("Be brief.\n\n# Tools")
    assert '"name":"get_weather"' in messages[0].content
    assert "at most one function" in messages[0].content
    assert orjson.loads(messages[2].content.split("\n")[1]) == {
        "name": "get_weather",
        "arguments": {"city": "Paris"},
    }
    assert messages[3].content == (
        "<tool_response>\n18C\n</tool_response>\n<tool_response>\nsunny\n</tool_response>"
    )
    assert plan.stops(["###"], 8) == ["###", CLOSE]
    assert render(turns[1:2], None)[0].content == "Weather?"


def test_required_job_carries_the_call_schema_and_none_no_section() -> None:
    body: dict[str, Any] = {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [TOOL],
        "tool_choice": "required",
    }
    req = ChatCompletionRequest.model_validate(body)
    params = req.job_params(1, req.tool_plan())
    assert params.response_format == "json_schema"
    assert params.json_schema == call_schema([WEATHER])
    none = ChatCompletionRequest.model_validate({**body, "tool_choice": "none"})
    params = none.job_params(1, none.tool_plan())
    assert params.json_schema is None
    assert params.messages is not None
    assert "# Tools" not in "".join(m.content for m in params.messages)


DEEP: dict[str, Any] = {"type": "object"}
for _ in range(31):  # 63 levels: within the request's bound, past it inside a call's schema
    DEEP = {"type": "object", "properties": {"a": DEEP}}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"tools": [{**TOOL, "function": {"name": "f", "parameters": {"type": "strin"}}}]},
         "tools.0.function.parameters"),
        ({"tools": [{**TOOL, "function": {"name": "f", "parameters": {"required": "x"}}}]},
         "tools.0.function.parameters"),
        ({"tools": [{**TOOL, "function": {"name": "f", "parameters": {"type": "string"}}}]},
         "tools.0.function.parameters"),
        ({"tools": [TOOL, TOOL]}, "tools.1.function.name"),
        ({"tools": [{**TOOL, "function": {"name": "f", "parameters": {"$schema": []}}}]},
         "tools.0.function.parameters"),
        ({"tools": [{**TOOL, "function": {"name": "f", "parameters": {"$schema": 5}}}]},
         "tools.0.function.parameters"),
        ({"tools": [{**TOOL, "function": {"name": "f", "parameters": {"pattern": "("}}}]},
         "tools.0.function.parameters"),
        ({"tools": [{**TOOL, "function": {"name": "f", "parameters": DEEP}}],
          "tool_choice": "required"}, "tools"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
         "tool_choice"),
    ],
)  # fmt: skip
def test_bad_tools_are_refused(body: dict[str, Any], param: str) -> None:
    full = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    with pytest.raises(InvalidRequest) as e:
        ChatCompletionRequest.model_validate(full).tool_plan()
    assert e.value.param == param


# Through the real edge, with the real clients.

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture
async def echo(worker_settings: WorkerSettings) -> AsyncIterator[None]:
    async with running(worker_settings):
        yield


@pytest.mark.usefixtures("echo")
@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"tools": [{**TOOL, "function": {"name": "f", "parameters": {"type": 5}}}]},
         "tools.0.function.parameters"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "get weather"}}]},
         "tools.0.function.name"),
        ({"messages": [*CHAT, {"role": "tool", "content": "18C"}]}, "messages.1"),
        ({"messages": [*CHAT, {"role": "tool", "content": "18C", "tool_call_id": "call_x"}]},
         "messages.1.tool_call_id"),
        ({"messages": [{"role": "user", "content": "hi", "tool_calls": [
            {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
         "messages.0"),
    ],
)  # fmt: skip
async def test_openai_sdk_gets_400_with_param(
    oai: openai.AsyncOpenAI, kwargs: dict[str, Any], param: str
) -> None:
    asked = {"model": "echo", "messages": CHAT, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        await oai.chat.completions.create(**asked)
    assert e.value.status_code == 400
    assert e.value.param == param
    assert e.value.type == "invalid_request_error"


@pytest.mark.usefixtures("echo")
async def test_ollama_client_gets_400_for_a_bad_schema(edge: str) -> None:
    ollama = pytest.importorskip("ollama")
    bad = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
           "properties": {"x": {"type": "strin"}}}}}  # fmt: skip
    client = ollama.AsyncClient(host=edge, headers={"Authorization": f"Bearer {API_KEY}"})
    try:
        with pytest.raises(ollama.ResponseError) as e:
            await client.chat(model="echo", messages=CHAT, tools=[bad], keep_alive=0)
    finally:
        await client.close()
    assert e.value.status_code == 400
    assert "not a valid JSON Schema" in e.value.error


@pytest.mark.usefixtures("echo")
async def test_tools_with_the_echo_engine_answer_prose(oai: openai.AsyncOpenAI) -> None:
    # The echo engine writes prompt words, never a call: auto answers text, finish "length".
    # Seeded: its words are drawn from the prompt, whose tool section holds "</tool_call>",
    # the stop string of one call at most; an unseeded draw of it ends the text with "stop".
    r = await oai.chat.completions.create(
        model="echo", messages=CHAT, tools=[TOOL], max_tokens=5, parallel_tool_calls=False,
        seed=3,
    )  # fmt: skip
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content
    stream = await oai.chat.completions.create(
        model="echo", messages=CHAT, tools=[TOOL], max_tokens=5, n=2, seed=7, stream=True
    )
    chunks = [c async for c in stream]
    for i in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(ch.delta.content or "" for ch in mine).split()  # each choice's words
        assert mine[-1].finish_reason == "length"
        assert not any(ch.delta.tool_calls for ch in mine)


async def test_ollama_history_with_calls_reaches_the_job_rendered(
    edge: str, nc: NATS, worker_settings: WorkerSettings
) -> None:
    ollama = pytest.importorskip("ollama")
    seen: list[TextJob] = []

    async def keep(msg: Any) -> None:
        job = decode_job(msg.data)
        assert isinstance(job, TextJob)
        seen.append(job)

    await nc.subscribe(job_subject("llm", "echo"), cb=keep)
    await nc.flush()
    history = [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "-3C", "tool_name": "get_weather"},
    ]  # fmt: skip
    client = ollama.AsyncClient(host=edge, headers={"Authorization": f"Bearer {API_KEY}"})
    async with running(worker_settings):
        try:
            r = await client.chat(
                model="echo", messages=history, tools=[TOOL], options={"num_predict": 3}
            )
        finally:
            await client.close()
    assert r.message.tool_calls is None  # the echo engine writes prompt words, no call
    (job,) = seen
    messages = job.params.messages or []
    assert [m.role for m in messages] == ["system", "user", "assistant", "user"]
    assert "<tools>" in messages[0].content
    assert '{"name":"get_weather","arguments":{"city":"Oslo"}}' in messages[2].content
    assert messages[3].content == "<tool_response>\n-3C\n</tool_response>"


def test_a_template_with_tools_renders_like_hugging_face() -> None:
    from edge.tools.template import Template
    from edge.tools.template import render as render_template

    source = (
        "{% if not messages %}{{ raise_exception('no messages') }}{% endif %}"
        "{{ bos_token }}{{ strftime_now('%Y') | length }}|{{ tools | tojson }}|"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[{{ c.function.arguments | tojson }}]{% endfor %}"
        "{% if m.name %}({{ m.name }}){% endif %};{% endfor %}"
    )
    template = Template(source, bos="<s>")
    assert template.has_tools
    turns = [
        Turn("user", "a < b?"),
        Turn("assistant", "", calls=(Call("c1", "get_weather", '{"city": "Nice"}'),)),
        Turn("tool", "ok", tool_call_id="c1"),
    ]
    tool = Function("get_weather", "The weather in <city> & 'region'.", WEATHER.parameters)
    text = render_template(template, turns, [tool])
    assert text.startswith("<s>4|[{")  # the BOS stays unless the worker's tokenizer adds one
    assert '"description": "The weather in <city> & \'region\'."' in text  # not \\u003c
    assert 'user:a < b?;assistant:[{"city": "Nice"}];tool:ok(get_weather);' in text
    with pytest.raises(InvalidRequest) as e:
        render_template(template, [], [WEATHER])
    assert e.value.param == "messages"
    assert not Template("{{ messages }}").has_tools
