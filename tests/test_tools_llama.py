"""Tool calling with real SmolLM2 on llama.cpp through the whole pipeline, driven by the
clients agents use, unchanged: the openai SDK, LangChain's ChatOpenAI and the ollama client.

A 135M model rarely decides to call a tool by itself, so ``auto`` is checked either way
(prose, or a call that validates), and deterministically by constraining the model's text to
a ``<tool_call>`` block with llama.cpp's ``grammar`` field: the edge then finds the call in
ordinary model output, as it would for a model that chose to call.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import jsonschema
import openai
import orjson
import pytest
from nats.aio.client import Client as NATS
from pydantic import BaseModel

from schemas.codec import decode_job
from schemas.jobs import TextJob
from schemas.subjects import job_subject
from tests.conftest import API_KEY, running
from workers.settings import WorkerSettings

pytest.importorskip("llama_cpp", reason="the llm extra is not installed (make install-llm)")

from workers.engines.gguf import DEFAULT_MODEL_ID, ModelConfig, bundled_gguf
from workers.engines.llama import LlamaEngine

MODEL = DEFAULT_MODEL_ID
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "London", "Tokyo"]},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": WEATHER_PARAMS,
    },
}
TIME_PARAMS = {
    "type": "object",
    "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
    "required": ["zone"],
}
CLOCK = {
    "type": "function",
    "function": {"name": "get_time", "description": "The time now.", "parameters": TIME_PARAMS},
}
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def engine() -> LlamaEngine:
    """One engine for the module; each runtime start()s and close()s it."""
    return LlamaEngine([ModelConfig(id=MODEL, path=bundled_gguf(), n_ctx=1024, n_threads=1)])


@pytest.fixture
async def llama(worker_settings: WorkerSettings, engine: LlamaEngine) -> AsyncIterator[None]:
    """A llama.cpp worker for the test."""
    async with running(worker_settings, engine):
        yield


def valid_call(call: Any) -> dict[str, Any]:
    """The call's arguments, parsed and validated against its function's schema."""
    args = orjson.loads(call.function.arguments)
    jsonschema.validate(args, SCHEMAS[call.function.name])
    assert call.id.startswith("call_")
    assert call.type == "function"
    return dict(args)


@pytest.mark.usefixtures("llama")
async def test_required_call_validates_streamed_and_not(oai: openai.AsyncOpenAI) -> None:
    asked: dict[str, Any] = {
        "model": MODEL,
        "messages": ASK,
        "tools": [WEATHER, CLOCK],
        "tool_choice": "required",
        "max_tokens": 40,
        "seed": 3,
        "temperature": 0,
    }
    whole = await oai.chat.completions.create(**asked)
    (call,) = whole.choices[0].message.tool_calls or []
    valid_call(call)
    assert whole.choices[0].finish_reason == "tool_calls"

    stream = await oai.chat.completions.create(**asked, stream=True)
    chunks = [c async for c in stream]
    deltas = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or ()]
    assert deltas[0].id
    assert deltas[0].function.name == call.function.name
    assert len(deltas) > 2  # the arguments came in pieces
    arguments = "".join(d.function.arguments or "" for d in deltas)
    assert orjson.loads(arguments) == orjson.loads(call.function.arguments)  # same seed, greedy
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.usefixtures("llama")
async def test_named_function_through_the_sdk_stream_helper(oai: openai.AsyncOpenAI) -> None:
    async with oai.chat.completions.stream(
        model=MODEL,
        messages=ASK,
        tools=[WEATHER, CLOCK],
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        max_tokens=30,
        seed=1,
    ) as stream:
        final = await stream.get_final_completion()  # the SDK stitches the deltas itself
    (call,) = final.choices[0].message.tool_calls or []
    assert call.function.name == "get_time"
    assert valid_call(call)["zone"] in ("UTC", "CET")
    assert final.choices[0].finish_reason == "tool_calls"


@pytest.mark.usefixtures("llama")
async def test_auto_is_prose_or_a_valid_call(oai: openai.AsyncOpenAI) -> None:
    r = await oai.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], max_tokens=24, seed=2
    )
    choice = r.choices[0]
    if choice.message.tool_calls:
        for call in choice.message.tool_calls:
            valid_call(call)
        assert choice.finish_reason == "tool_calls"
    else:
        assert choice.message.content
        assert choice.finish_reason in ("stop", "length")


# The model's text held to one <tool_call> block: what a model that chose to call writes.
CALL_GRAMMAR = (
    'root ::= "Let me check.\\n<tool_call>\\n" call "\\n</tool_call>"\n'
    'call ::= "{\\"name\\": \\"get_weather\\", \\"arguments\\": {\\"city\\": \\"" city "\\", '
    '\\"unit\\": \\"celsius\\"}}"\n'
    'city ::= "Paris" | "London"\n'
)


@pytest.mark.usefixtures("llama")
async def test_auto_finds_the_call_the_model_writes(oai: openai.AsyncOpenAI) -> None:
    asked: dict[str, Any] = {
        "model": MODEL,
        "messages": ASK,
        "tools": [WEATHER],
        "tool_choice": "auto",
        "max_tokens": 60,
        "seed": 4,
        "extra_body": {"grammar": CALL_GRAMMAR},
    }
    whole = await oai.chat.completions.create(**asked)
    message = whole.choices[0].message
    (call,) = message.tool_calls or []
    assert valid_call(call)["city"] in ("Paris", "London")
    assert message.content == "Let me check."
    assert whole.choices[0].finish_reason == "tool_calls"

    stream = await oai.chat.completions.create(**asked, stream=True)
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert "<tool_call" not in text  # held back, never leaked as content
    assert text.strip() == "Let me check."
    deltas = [tc for c in chunks for tc in c.choices[0].delta.tool_calls or ()]
    assert orjson.loads("".join(d.function.arguments or "" for d in deltas)) == valid_call(call)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.usefixtures("llama")
async def test_none_is_prose(oai: openai.AsyncOpenAI) -> None:
    r = await oai.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=12, seed=2
    )
    assert r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content
    assert r.choices[0].finish_reason in ("stop", "length")


@pytest.mark.usefixtures("llama")
async def test_round_trip_with_a_tool_result(oai: openai.AsyncOpenAI) -> None:
    first = await oai.chat.completions.create(
        model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required", max_tokens=40, seed=5
    )
    message = first.choices[0].message
    (call,) = message.tool_calls or []
    history: list[Any] = [
        *ASK,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": 18}'},
    ]
    second = await oai.chat.completions.create(
        model=MODEL, messages=history, tools=[WEATHER], max_tokens=16, seed=5
    )
    answer = second.choices[0]
    assert answer.message.content or answer.message.tool_calls
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the call and result went in


@pytest.mark.usefixtures("llama")
async def test_langchain_bind_tools_and_structured_output(edge: str) -> None:
    from langchain_openai import ChatOpenAI

    class Weather(BaseModel):
        """The weather asked about."""

        city: str
        celsius: int

    async with httpx.AsyncClient() as http:  # ChatOpenAI leaves its own one open
        llm = ChatOpenAI(
            model=MODEL,
            base_url=f"{edge}/v1",
            api_key=API_KEY,
            max_retries=0,
            max_tokens=40,
            seed=1,
            http_async_client=http,
        )
        bound = llm.bind_tools([WEATHER], tool_choice="get_weather")
        reply = await bound.ainvoke("Weather in Tokyo, please.")
        streamed = None
        async for chunk in bound.astream("Weather in Tokyo, please."):
            streamed = chunk if streamed is None else streamed + chunk  # LangChain's merge
        structured = llm.with_structured_output(Weather, method="function_calling")
        got = await structured.ainvoke("Paris is 21 degrees today.")
    (call,) = reply.tool_calls
    assert call["name"] == "get_weather"
    jsonschema.validate(call["args"], WEATHER_PARAMS)
    assert streamed is not None
    (streamed_call,) = streamed.tool_calls  # stitched from the argument pieces
    assert streamed_call["name"] == "get_weather"
    jsonschema.validate(streamed_call["args"], WEATHER_PARAMS)
    assert isinstance(got, Weather)


@pytest.mark.usefixtures("llama")
async def test_ollama_client_gets_calls_with_object_arguments(edge: str) -> None:
    ollama = pytest.importorskip("ollama")
    schema = {
        "type": "object",
        "properties": {
            "name": {"const": "get_weather"},
            "arguments": WEATHER_PARAMS,
        },
        "required": ["name", "arguments"],
    }
    client = ollama.AsyncClient(host=edge, headers=AUTH)
    try:
        # Ollama has no tool_choice; ``format`` holds this model to a bare call object, the
        # Llama 3 form of a call, which the edge takes for one when it names an offered tool.
        r = await client.chat(
            model=MODEL,
            messages=ASK,
            tools=[WEATHER],
            format=schema,
            options={"num_predict": 40, "seed": 1},
            keep_alive="5m",
        )
        pieces = [
            p
            async for p in await client.chat(
                model=MODEL,
                messages=ASK,
                tools=[WEATHER],
                format=schema,
                options={"num_predict": 40, "seed": 1},
                stream=True,
            )
        ]
    finally:
        await client.close()
    (call,) = r.message.tool_calls or []
    assert call.function.name == "get_weather"
    assert isinstance(call.function.arguments, dict)
    jsonschema.validate(dict(call.function.arguments), WEATHER_PARAMS)
    streamed = [c for p in pieces for c in p.message.tool_calls or ()]
    assert [c.function.arguments for c in streamed] == [call.function.arguments]
    assert pieces[-1].done


# A ChatML template with a tools section of its own, written for this test in the manner of
# Qwen's and Hermes' templates (which say "tools" and render calls as <tool_call> JSON).
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nFunctions:{% for t in tools %} "
    "[{{ t.function.name }}: {{ t.function.parameters | tojson }}]{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|im_start|>user\n<tool_response>{{ m.name }}: {{ m.content }}"
    "</tool_response><|im_end|>\n"
    "{% elif m.tool_calls %}<|im_start|>assistant\n{% for c in m.tool_calls %}<tool_call>"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}'
    "</tool_call>{% endfor %}<|im_end|>\n"
    "{% else %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


async def test_a_template_with_tools_renders_them_itself(
    oai: openai.AsyncOpenAI, nc: NATS, worker_settings: WorkerSettings
) -> None:
    model = "smollm2-tools"
    engine = LlamaEngine(
        [
            ModelConfig(
                id=model,
                path=bundled_gguf(),
                n_ctx=1024,
                n_threads=1,
                chat_template=TOOLS_TEMPLATE,
            )
        ]
    )
    seen: list[TextJob] = []

    async def keep(msg: Any) -> None:
        job = decode_job(msg.data)
        assert isinstance(job, TextJob)
        seen.append(job)

    await nc.subscribe(job_subject("llm", model), cb=keep)  # the jobs as the edge publishes them
    history: list[Any] = [
        *ASK,
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type":
         "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "user", "content": "And in London?"},
    ]  # fmt: skip
    async with running(worker_settings, engine):
        r = await oai.chat.completions.create(
            model=model,
            messages=history,
            tools=[WEATHER],
            tool_choice="required",
            max_tokens=40,
            seed=1,
        )
    (call,) = r.choices[0].message.tool_calls or []
    valid_call(call)
    (job,) = seen
    assert job.params.messages is None  # rendered at the edge, by the model's own template
    prompt = job.params.prompt
    assert isinstance(prompt, str)
    assert prompt.startswith("<|im_start|>system\nFunctions: [get_weather: {")
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}' in prompt
    assert "<tool_response>get_weather: 18C</tool_response>" in prompt
    assert "# Tools" not in prompt  # not the convention for templates without a tools section
