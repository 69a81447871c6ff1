"""Each API's request becomes typed job parameters; job parameters refuse unknown fields."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from edge.a1111.requests import Img2ImgRequest, Txt2ImgRequest
from edge.llamacpp.requests import CompletionRequest as LlamaCompletion
from edge.ollama.requests import ChatRequest, GenerateRequest
from edge.openai.image_generation import ImageGenerationRequest
from edge.openai.requests import ChatCompletionRequest, CompletionRequest
from schemas.codec import decode_job, encode
from schemas.errors import InvalidRequest, Poison
from schemas.jobs import ChatMessage, ImageInput, ImageParams, TextParams
from tests.conftest import text_job
from workers.engines.llama_rpc import apply_template

USER = [{"role": "user", "content": "hi"}]


def user(content: str = "hi") -> ChatMessage:
    return ChatMessage(role="user", content=content)


# -- the job models -------------------------------------------------------------------------


def test_a_misspelt_text_parameter_is_an_error_not_a_default() -> None:
    with pytest.raises(ValidationError, match="max_token"):
        TextParams(seed=1, max_token=3)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("model", "fields"),
    [
        (TextParams, {"seed": 1, "temprature": 0.5}),
        (ImageParams, {"prompt": "a cat", "seed": 1, "step": 5}),
        (ChatMessage, {"role": "user", "content": "hi", "tool_call_id": "x"}),
        (ImageInput, {"b64": "x", "url": "http://x"}),
    ],
)
def test_job_parameter_models_forbid_unknown_fields(model: Any, fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        model.model_validate(fields)


def test_a_job_whose_params_carry_an_unknown_field_is_poison() -> None:
    data = encode(text_job()).replace(b'"params":{', b'"params":{"max_token":3,')
    with pytest.raises(Poison, match="max_token"):
        decode_job(data)


def test_apply_template_still_ignores_unknown_message_fields() -> None:
    class Template:
        def render(self, messages: list[ChatMessage]) -> str:
            return "|".join(f"{m.role}:{m.content}" for m in messages)

    payload = {"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}
    assert apply_template(Template(), payload) == {"prompt": "tool:42"}  # type: ignore[arg-type]


def test_the_envelope_stays_forward_compatible() -> None:
    data = encode(text_job()).replace(b'"stream":true', b'"stream":true,"future_field":1')
    assert decode_job(data).model_extra == {"future_field": 1}


# -- OpenAI ---------------------------------------------------------------------------------


def test_openai_chat_defaults() -> None:
    req = ChatCompletionRequest.model_validate({"model": "m", "messages": USER})
    assert req.job_params(7) == TextParams(
        messages=[user()],
        max_tokens=None,
        temperature=1.0,
        top_p=1.0,
        top_k=40,
        min_p=0.05,
        typical_p=1.0,
        repeat_penalty=1.0,
        seed=7,
        response_format="text",
    )


def test_openai_chat_request_becomes_text_params() -> None:
    req = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
                {"role": "user", "content": "hi", "name": "ann"},
            ],
            "max_tokens": 9, "max_completion_tokens": 5, "temperature": 0.3, "top_p": 0.5,
            "stop": "\n", "presence_penalty": 1.0, "frequency_penalty": -1.0,
            "logit_bias": {"5": 2}, "top_k": 3, "min_p": 0.1, "typical_p": 0.9,
            "repeat_penalty": 1.2, "grammar": 'root ::= "a"', "logprobs": True, "top_logprobs": 2,
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}},
        }
    )  # fmt: skip
    assert req.job_params(3) == TextParams(
        messages=[
            ChatMessage(role="system", content="be brief"),
            ChatMessage(role="user", content="hi", name="ann"),
        ],
        max_tokens=5,  # max_completion_tokens wins
        temperature=0.3,
        top_p=0.5,
        top_k=3,
        min_p=0.1,
        typical_p=0.9,
        repeat_penalty=1.2,
        presence_penalty=1.0,
        frequency_penalty=-1.0,
        seed=3,
        stop=["\n"],
        logit_bias={"5": 2.0},
        logprobs=True,
        top_logprobs=2,
        grammar='root ::= "a"',
        json_schema={"type": "object"},
        response_format="json_schema",
    )


def test_openai_response_format_text_ignores_a_schema() -> None:
    fmt = {"type": "text", "json_schema": {"schema": {"type": "object"}}}
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": USER, "response_format": fmt}
    )
    p = req.job_params(1)
    assert (p.response_format, p.json_schema) == ("text", None)
    fmt = {"type": "json_object"}
    req = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": USER, "response_format": fmt}
    )
    p = req.job_params(1)
    assert (p.response_format, p.json_schema) == ("json_object", None)


def test_openai_completion_defaults() -> None:
    req = CompletionRequest.model_validate({"model": "m", "prompt": "hi"})
    assert req.job_params(7) == TextParams(
        prompt="hi",
        max_tokens=16,  # OpenAI's default for completions, unlike chat
        temperature=1.0,
        top_p=1.0,
        top_k=40,
        min_p=0.05,
        seed=7,
        logprobs=False,
        top_logprobs=None,
    )


def test_openai_completion_request_becomes_text_params() -> None:
    req = CompletionRequest.model_validate(
        {"model": "m", "prompt": [1, 2, 3], "max_tokens": None, "logprobs": 2, "stop": ["x"],
         "temperature": 0.0, "grammar": "g", "logit_bias": {"1": -100}}
    )  # fmt: skip
    assert req.job_params(4) == TextParams(
        prompt=[1, 2, 3],
        max_tokens=None,
        temperature=0.0,
        seed=4,
        stop=["x"],
        logit_bias={"1": -100.0},
        logprobs=True,
        top_logprobs=2,
        grammar="g",
    )
    one = CompletionRequest.model_validate({"model": "m", "prompt": ["one"], "logprobs": 0})
    p = one.job_params(4)
    assert (p.prompt, p.logprobs, p.top_logprobs) == ("one", True, 0)


# -- llama.cpp ------------------------------------------------------------------------------


def test_llamacpp_defaults() -> None:
    req = LlamaCompletion.model_validate({"prompt": "hi"})
    assert req.asked_seed() is None  # -1: a random seed
    assert req.job_params(7) == TextParams(
        prompt="hi",
        max_tokens=None,  # n_predict -1: until a stop
        temperature=0.8,
        top_k=40,
        top_p=0.95,
        min_p=0.05,
        typical_p=1.0,
        repeat_penalty=1.0,
        repeat_last_n=64,
        mirostat=0,
        seed=7,
        response_format="text",
        logprobs=False,
        top_logprobs=None,
    )


def test_llamacpp_request_becomes_text_params() -> None:
    req = LlamaCompletion.model_validate(
        {"prompt": [1, 2], "n_predict": 5, "temperature": 0.1, "top_k": 1, "top_p": 0.2,
         "min_p": 0.3, "typical_p": 0.4, "repeat_penalty": 1.5, "repeat_last_n": -1,
         "presence_penalty": 0.5, "frequency_penalty": 0.6, "mirostat": 2, "mirostat_tau": 3,
         "mirostat_eta": 0.2, "grammar": "g", "json_schema": {"type": "object"}, "seed": 9,
         "stop": ["s"], "ignore_eos": True, "logit_bias": [[1, False], [2, 3.5]], "n_probs": 3}
    )  # fmt: skip
    assert req.asked_seed() == 9
    assert req.job_params(9) == TextParams(
        prompt=[1, 2],
        max_tokens=5,
        temperature=0.1,
        top_k=1,
        top_p=0.2,
        min_p=0.3,
        typical_p=0.4,
        repeat_penalty=1.5,
        repeat_last_n=-1,
        presence_penalty=0.5,
        frequency_penalty=0.6,
        mirostat=2,
        mirostat_tau=3.0,
        mirostat_eta=0.2,
        grammar="g",
        json_schema={"type": "object"},
        response_format="json_schema",
        seed=9,
        stop=["s"],
        ignore_eos=True,
        logit_bias={"1": False, "2": 3.5},  # false: banned (the worker's -inf)
        logprobs=True,
        top_logprobs=3,
    )


def test_llamacpp_random_seeds_and_bad_biases() -> None:
    assert LlamaCompletion.model_validate({"prompt": "x", "seed": 2**32 - 1}).asked_seed() is None
    bad = LlamaCompletion.model_validate({"prompt": "x", "logit_bias": [[1, 2, 3]]})
    with pytest.raises(InvalidRequest, match=r"\[token, bias\] pairs") as e:
        bad.job_params(1)
    assert e.value.param == "logit_bias"


@pytest.mark.parametrize(
    ("prompt", "prompts"),
    [
        ("text", ["text"]),
        ([1, 2], [[1, 2]]),
        ([1, "a", 2], [[1, "a", 2]]),  # ids with strings among them: one prompt
        (["a", "b"], ["a", "b"]),  # strings only: a batch, as llama.cpp reads it
        ([[1, 2], "b", [3, "c"]], [[1, 2], "b", [3, "c"]]),
        ({"prompt_string": "p", "multimodal_data": []}, ["p"]),
        ([{"prompt_string": "p"}, "q"], ["p", "q"]),
    ],
)
def test_llamacpp_prompt_forms(prompt: object, prompts: list[object]) -> None:
    assert LlamaCompletion.model_validate({"prompt": prompt}).prompts() == prompts


def test_llamacpp_logit_bias_forms() -> None:
    def read(value: object) -> tuple[dict[int, object], list[tuple[str, object]]]:
        biases = LlamaCompletion.model_validate({"prompt": "x", "logit_bias": value}).biases()
        return biases.ids, biases.pieces

    assert read({"15": 1, " Paris": False}) == ({15: 1.0}, [(" Paris", False)])
    assert read([[15, 1], ["hi", -2.5], [15, 0.5]]) == ({15: 1.5}, [("hi", -2.5)])  # adds up
    assert read([[15, False], [15, 3]]) == ({15: False}, [])  # a ban stays a ban
    assert read({" 7": 2}) == ({7: 2.0}, [])  # strtol's reading of a decimal key
    with pytest.raises(InvalidRequest, match="pieces need the tokenizer"):
        LlamaCompletion.model_validate({"prompt": "x", "logit_bias": [["a", 1]]}).job_params(1)


# -- Ollama ---------------------------------------------------------------------------------


def test_ollama_defaults() -> None:
    req = ChatRequest.model_validate({"model": "m", "messages": USER})
    assert req.options.asked_seed() is None
    assert req.job_params(7) == TextParams(
        messages=[user()],
        max_tokens=None,  # num_predict -1: no limit
        temperature=0.8,
        top_p=0.9,
        top_k=40,
        min_p=0.0,
        typical_p=1.0,
        repeat_penalty=1.1,
        repeat_last_n=64,
        seed=7,
        response_format="text",
    )


def test_ollama_chat_request_becomes_text_params() -> None:
    options = {
        "seed": 3, "num_predict": 5, "temperature": 0.1, "top_p": 0.2, "top_k": 3, "min_p": 0.4,
        "typical_p": 0.5, "repeat_penalty": 1.3, "repeat_last_n": 8, "presence_penalty": 1.0,
        "frequency_penalty": 1.5, "mirostat": 1, "mirostat_tau": 2.0, "mirostat_eta": 0.3,
        "stop": ["x"],
    }  # fmt: skip
    body = {"model": "m", "messages": USER, "format": {"type": "object"}, "options": options}
    req = ChatRequest.model_validate(body)
    assert req.options.asked_seed() == 3
    assert req.job_params(3) == TextParams(
        messages=[user()],
        max_tokens=5,
        temperature=0.1,
        top_p=0.2,
        top_k=3,
        min_p=0.4,
        typical_p=0.5,
        repeat_penalty=1.3,
        repeat_last_n=8,
        presence_penalty=1.0,
        frequency_penalty=1.5,
        mirostat=1,
        mirostat_tau=2.0,
        mirostat_eta=0.3,
        seed=3,
        stop=["x"],
        response_format="json_schema",
        json_schema={"type": "object"},
    )


@pytest.mark.parametrize(("num_predict", "max_tokens"), [(-1, None), (-2, None), (0, None), (5, 5)])
def test_ollama_num_predict(num_predict: int, max_tokens: int | None) -> None:
    body = {"model": "m", "messages": USER, "options": {"num_predict": num_predict}}
    assert ChatRequest.model_validate(body).job_params(1).max_tokens == max_tokens


def test_ollama_generate_becomes_chat_turns_unless_raw() -> None:
    body: dict[str, Any] = {"model": "m", "prompt": "p", "format": "json", "options": {"seed": -1}}
    req = GenerateRequest.model_validate(body)
    assert req.options.asked_seed() is None
    p = req.job_params(1)
    assert (p.messages, p.prompt, p.response_format) == ([user("p")], None, "json_object")
    req = GenerateRequest.model_validate({**body, "system": "s"})
    assert req.job_params(1).messages == [ChatMessage(role="system", content="s"), user("p")]
    raw = GenerateRequest.model_validate({**body, "system": "s", "raw": True}).job_params(1)
    assert (raw.messages, raw.prompt) == (None, "p")


# -- AUTOMATIC1111 and OpenAI images ----------------------------------------------------------


def test_a1111_defaults() -> None:
    req = Txt2ImgRequest.model_validate({"prompt": "a cat"})
    assert req.asked_seed() is None  # -1: a random seed
    assert req.job_params(7, 0) == ImageParams(
        prompt="a cat",
        negative_prompt="",
        steps=50,  # A1111's default, not ImageParams' 20
        cfg_scale=7.0,
        width=512,
        height=512,
        seed=7,
        sampler="Euler",
        batch_size=1,
        n_iter=1,
        denoising_strength=0.75,
        preview_every=0,
    )
    img2img = Img2ImgRequest.model_validate({"prompt": "a cat", "init_images": ["x"]})
    assert img2img.job_params(7, 0).denoising_strength == 0.75


def test_a1111_requests_become_image_params() -> None:
    body = {
        "prompt": "a cat", "negative_prompt": "a dog", "steps": 10, "cfg_scale": 5.0,
        "width": 256, "height": 128, "seed": 3, "sampler_name": "DPM++ 2M",
        "scheduler": "Karras", "batch_size": 2, "n_iter": 3,
    }  # fmt: skip
    req = Txt2ImgRequest.model_validate(body)
    assert req.asked_seed() == 3
    expected = ImageParams(
        prompt="a cat",
        negative_prompt="a dog",
        steps=10,
        cfg_scale=5.0,
        width=256,
        height=128,
        seed=3,
        sampler="DPM++ 2M Karras",
        batch_size=2,
        n_iter=3,
        denoising_strength=0.75,
        preview_every=2,
    )
    assert req.job_params(3, 2) == expected
    img2img = Img2ImgRequest.model_validate(
        {**body, "init_images": ["x"], "denoising_strength": 0.4}
    )
    assert img2img.job_params(3, 2) == expected.model_copy(update={"denoising_strength": 0.4})


def test_openai_image_request_becomes_image_params() -> None:
    req = ImageGenerationRequest.model_validate({"prompt": "a cat"})
    assert req.job_params(7, 20) == ImageParams(
        prompt="a cat",
        negative_prompt="",
        steps=20,
        cfg_scale=7.0,
        width=512,
        height=512,
        seed=7,
        sampler="Euler",
        batch_size=1,
    )
    body = {"prompt": "a cat", "n": 2, "size": "256x128", "negative_prompt": "a dog"}
    assert ImageGenerationRequest.model_validate(body).job_params(5, 9) == ImageParams(
        prompt="a cat",
        negative_prompt="a dog",
        steps=9,
        width=256,
        height=128,
        seed=5,
        batch_size=2,
    )
