"""Agent frameworks, unchanged, against the real edge, nats-server and SmolLM2 on llama.cpp:
LangChain's ChatOpenAI (invoke, stream, with_structured_output(method="json_schema")) and
LiteLLM (completion and streaming through its ``openai/`` provider with ``api_base``).

Each reads answers its own way (LangChain parses the structured output itself; LiteLLM
rebuilds chunks into its ModelResponse), so what passes here is what their users get.
"""

from __future__ import annotations

import os
from typing import Literal

import pytest
from pydantic import BaseModel

from tests.conftest import API_KEY, running
from workers.settings import WorkerSettings

pytest.importorskip("llama_cpp", reason="the llm extra is not installed (make install-llm)")

from workers.engines.gguf import DEFAULT_MODEL_ID, ModelConfig, bundled_gguf
from workers.engines.llama import LlamaEngine

langchain_openai = pytest.importorskip("langchain_openai")
# LiteLLM fetches its model price list from the network at import unless told to use its own.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
litellm = pytest.importorskip("litellm")

ASK = "Name one colour."


class Colour(BaseModel):
    """What the structured-output test asks for: the grammar keeps the answer to these."""

    name: Literal["red", "green", "blue"]


@pytest.fixture(scope="module")
def engine() -> LlamaEngine:
    config = ModelConfig(id=DEFAULT_MODEL_ID, path=bundled_gguf(), n_ctx=512, n_threads=1)
    return LlamaEngine([config])


def chat_model(edge: str, **kwargs: object) -> object:
    return langchain_openai.ChatOpenAI(
        model=DEFAULT_MODEL_ID,
        base_url=f"{edge}/v1",
        api_key=API_KEY,
        max_retries=0,
        temperature=0,
        **kwargs,
    )


async def test_langchain_invoke_stream_and_json_schema(
    edge: str, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    # ignore_eos (llama.cpp's, through each client's extra_body): exactly 8 tokens, whatever
    # the model would say, so finish_reason and usage have one right answer.
    llm = chat_model(edge, max_tokens=8, extra_body={"ignore_eos": True})
    async with running(worker_settings, engine):
        whole = await llm.ainvoke(ASK)  # type: ignore[attr-defined]
        pieces = [c async for c in llm.astream(ASK)]  # type: ignore[attr-defined]
        structured = chat_model(edge, max_tokens=24).with_structured_output(  # type: ignore[attr-defined]
            Colour, method="json_schema"
        )
        colour = await structured.ainvoke("Pick a colour for the sky.")
    assert isinstance(whole.content, str)
    assert whole.content
    assert whole.response_metadata["finish_reason"] == "length"
    assert whole.usage_metadata["output_tokens"] == 8
    streamed = "".join(str(p.content) for p in pieces)
    assert streamed == whole.content  # temperature 0: the same text either way
    assert isinstance(colour, Colour)


async def test_litellm_completion_and_stream_through_the_openai_provider(
    edge: str, worker_settings: WorkerSettings, engine: LlamaEngine
) -> None:
    common = {
        "model": f"openai/{DEFAULT_MODEL_ID}",
        "api_base": f"{edge}/v1",
        "api_key": API_KEY,
        "messages": [{"role": "user", "content": ASK}],
        "max_tokens": 8,
        "temperature": 0,
        "num_retries": 0,
        "extra_body": {"ignore_eos": True},
    }
    async with running(worker_settings, engine):
        whole = await litellm.acompletion(**common)
        stream = await litellm.acompletion(**common, stream=True)
        chunks = [c async for c in stream]
    text = whole.choices[0].message.content
    assert text
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 8
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == "length"
