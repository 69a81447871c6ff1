"""The pure parts of the llama engine: parameter mapping, stop holdback, delta coalescing."""

from __future__ import annotations

import math

import llama_cpp
import orjson
import pytest
from llama_cpp._internals import LlamaSampler

from schemas.errors import ContextLengthExceeded, InvalidRequest
from schemas.events import TokenLogprob
from schemas.jobs import TextParams
from workers.engines.decode import Piece, add_step, merge
from workers.engines.sampling import (
    LLAMA_DEFAULT_SEED,
    Dist,
    Grammar,
    Greedy,
    MinP,
    Mirostat,
    MirostatV2,
    Penalties,
    Temp,
    TopK,
    TopP,
    Typical,
    plan,
    token_budget,
)
from workers.engines.stops import StopHoldback

N_VOCAB = 1000
N_CTX = 512


def params(**kw: object) -> TextParams:
    kw.setdefault("seed", 7)
    return TextParams.model_validate({"prompt": "hi", **kw})


def test_default_chain_is_llama_cpp_order() -> None:
    sp = plan(params(), n_vocab=N_VOCAB, n_ctx=N_CTX)
    assert sp.steps == (TopK(40), Typical(1.0), TopP(1.0), MinP(0.05), Temp(1.0), Dist(7))
    assert sp.logit_bias == {}
    assert sp.penalties is None
    assert sp.grammar is None
    assert sp.seed == 7


def test_every_sampling_value_reaches_the_chain() -> None:
    p = params(temperature=0.7, top_k=5, top_p=0.9, min_p=0.1, typical_p=0.8, seed=123)
    assert plan(p, n_vocab=N_VOCAB, n_ctx=N_CTX).steps == (
        TopK(5),
        Typical(0.8),
        TopP(0.9),
        MinP(0.1),
        Temp(0.7),
        Dist(123),
    )


def test_integer_arguments_stay_integers() -> None:
    # llama.cpp takes k and seeds as ints: nothing on the way may turn them into floats.
    default = plan(params(top_k=5, seed=2**32 - 2), n_vocab=N_VOCAB, n_ctx=N_CTX).steps
    mirostat = plan(params(mirostat=2, seed=9), n_vocab=N_VOCAB, n_ctx=N_CTX).steps
    assert isinstance(default[0], TopK)
    assert type(default[0].k) is int
    assert isinstance(default[-1], Dist)
    assert type(default[-1].seed) is int
    assert default[-1].seed == 2**32 - 2
    assert isinstance(mirostat[-1], MirostatV2)
    assert type(mirostat[-1].seed) is int


def test_temperature_zero_is_greedy() -> None:
    assert plan(params(temperature=0), n_vocab=N_VOCAB, n_ctx=N_CTX).steps == (Greedy(),)


@pytest.mark.parametrize(("mode", "step"), [(1, Mirostat), (2, MirostatV2)])
def test_mirostat_replaces_the_truncation_samplers(
    mode: int, step: type[Mirostat | MirostatV2]
) -> None:
    p = params(mirostat=mode, mirostat_tau=4.0, mirostat_eta=0.2, temperature=0.5)
    assert plan(p, n_vocab=N_VOCAB, n_ctx=N_CTX).steps == (Temp(0.5), step(7, 4.0, 0.2))


@pytest.mark.parametrize("kw", [{}, {"temperature": 0}, {"mirostat": 1}, {"mirostat": 2}])
def test_every_kind_of_plan_builds_a_llama_cpp_chain(kw: dict[str, object]) -> None:
    steps = plan(params(**kw), n_vocab=N_VOCAB, n_ctx=N_CTX).steps
    sampler = LlamaSampler()  # no model needed: the chain's samplers take plain arguments
    try:
        for step in steps:
            add_step(sampler, step, N_VOCAB)
        assert llama_cpp.llama_sampler_chain_n(sampler.sampler) == len(steps)
    finally:
        sampler.close()


def test_the_seed_llama_cpp_reads_as_random_is_never_passed() -> None:
    sp = plan(params(seed=LLAMA_DEFAULT_SEED), n_vocab=N_VOCAB, n_ctx=N_CTX)
    assert sp.seed != LLAMA_DEFAULT_SEED
    assert sp.steps[-1] == Dist(sp.seed)


def test_logit_bias_keys_are_token_ids() -> None:
    sp = plan(params(logit_bias={"15": 2.5, "999": -100}), n_vocab=N_VOCAB, n_ctx=N_CTX)
    assert sp.logit_bias == {15: 2.5, 999: -100.0}


def test_a_false_bias_bans_the_token() -> None:
    """llama.cpp's ``false``: -inf, which the job spells false since JSON has no infinity."""
    sp = plan(params(logit_bias={"15": False, "16": 0.0}), n_vocab=N_VOCAB, n_ctx=N_CTX)
    assert sp.logit_bias == {15: -math.inf, 16: 0.0}


@pytest.mark.parametrize("key", ["abc", "1000", "-1"])
def test_bad_logit_bias_is_an_invalid_request(key: str) -> None:
    with pytest.raises(InvalidRequest) as e:
        plan(params(logit_bias={key: 1.0}), n_vocab=N_VOCAB, n_ctx=N_CTX)
    assert e.value.param == "logit_bias"


def test_ignore_eos_bans_every_end_of_generation_token() -> None:
    p = params(ignore_eos=True, logit_bias={"5": 1.0})
    sp = plan(p, n_vocab=N_VOCAB, n_ctx=N_CTX, eog=[0, 2])
    assert sp.logit_bias == {5: 1.0, 0: -math.inf, 2: -math.inf}
    assert plan(params(), n_vocab=N_VOCAB, n_ctx=N_CTX, eog=[0, 2]).logit_bias == {}


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({}, None),
        ({"repeat_penalty": 1.1}, Penalties(64, 1.1, 0.0, 0.0)),
        ({"repeat_penalty": 1.1, "repeat_last_n": -1}, Penalties(N_CTX, 1.1, 0.0, 0.0)),
        ({"repeat_penalty": 1.1, "repeat_last_n": 0}, None),
        ({"repeat_penalty": 0.0}, None),
        (
            {"frequency_penalty": 0.5, "presence_penalty": -0.5, "repeat_last_n": 16},
            Penalties(16, 1.0, 0.5, -0.5),
        ),
    ],
)
def test_penalties(kw: dict[str, float], expected: Penalties | None) -> None:
    assert plan(params(**kw), n_vocab=N_VOCAB, n_ctx=N_CTX).penalties == expected


SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.mark.parametrize(
    ("kw", "expected"),
    [
        ({"grammar": 'root ::= "yes"'}, Grammar("gbnf", 'root ::= "yes"')),
        ({"response_format": "json_object"}, Grammar("json")),
        (
            {"response_format": "json_schema", "json_schema": SCHEMA},
            Grammar("json_schema", orjson.dumps(SCHEMA).decode()),
        ),
        ({"json_schema": SCHEMA}, Grammar("json_schema", orjson.dumps(SCHEMA).decode())),
        ({"grammar": ""}, None),
    ],
)
def test_grammar_requests(kw: dict[str, object], expected: Grammar | None) -> None:
    assert plan(params(**kw), n_vocab=N_VOCAB, n_ctx=N_CTX).grammar == expected


@pytest.mark.parametrize(
    "kw",
    [
        {"response_format": "json_schema"},
        {"grammar": 'root ::= "x"', "response_format": "json_object"},
        {"grammar": 'root ::= "x"', "json_schema": SCHEMA},
    ],
)
def test_conflicting_or_incomplete_grammar_requests_are_invalid(kw: dict[str, object]) -> None:
    with pytest.raises(InvalidRequest):
        plan(params(**kw), n_vocab=N_VOCAB, n_ctx=N_CTX)


def test_token_budget() -> None:
    assert token_budget(None, 100, 512, "m") == 412
    assert token_budget(10, 100, 512, "m") == 10
    assert token_budget(1000, 100, 512, "m") == 412  # stops at the end of the context
    assert token_budget(None, 511, 512, "m") == 1


def test_a_prompt_filling_the_context_is_context_length_exceeded() -> None:
    with pytest.raises(ContextLengthExceeded, match=r"600 tokens .* m holds 512"):
        token_budget(5, 600, 512, "m")
    with pytest.raises(ContextLengthExceeded):
        token_budget(None, 512, 512, "m")


def feed(hold: StopHoldback, pieces: list[str]) -> list[str]:
    return [hold.push(p) for p in pieces] + [hold.flush()]


def test_without_stops_text_passes_straight_through() -> None:
    assert feed(StopHoldback([]), ["a", "b<", "c"]) == ["a", "b<", "c", ""]


def test_a_stop_split_over_pieces_is_never_sent() -> None:
    hold = StopHoldback(["<|end|>"])
    assert feed(hold, ["Hello <", "|en", "d|> more"]) == ["Hello ", "", "", ""]
    assert hold.stopped


def test_held_text_is_released_once_it_cannot_be_a_stop() -> None:
    hold = StopHoldback(["STOP"])
    assert hold.push("abc ST") == "abc "
    assert hold.pending == "ST"
    assert hold.push("ar") == "STar"
    assert not hold.stopped


def test_generation_ending_mid_prefix_releases_the_held_text() -> None:
    hold = StopHoldback(["\n\n"])
    assert feed(hold, ["one\n"]) == ["one", "\n"]


def test_earliest_of_several_stops_wins_and_nothing_follows() -> None:
    hold = StopHoldback(["world", "lo"])
    assert feed(hold, ["hello world", "again"]) == ["hel", "", ""]


def test_empty_stop_strings_are_ignored() -> None:
    assert feed(StopHoldback(["", "zz"]), ["abc"]) == ["abc", ""]


@pytest.mark.parametrize("stops", [[", fox"], ["ox j", "lazy"], ["dog"], ["nothing"]])
def test_any_split_of_the_text_gives_the_same_output(stops: list[str]) -> None:
    text = "the quick brown, fox jumps over the lazy dog"
    expected = text
    for s in stops:
        if s in text:
            expected = expected[: text.index(s)] if text.index(s) < len(expected) else expected
    for i in range(len(text) + 1):
        for j in range(i, len(text) + 1, 3):
            hold = StopHoldback(stops)
            out = feed(hold, [text[:i], text[i:j], text[j:]])
            assert "".join(out) == expected
            assert not any(s in "".join(out) for s in stops)


def test_merge_coalesces_pieces_into_one_delta() -> None:
    lp = [TokenLogprob(token=t, logprob=-1.0) for t in "abc"]
    delta = merge([Piece("a", 1, lp[:1]), Piece("bc", 2, lp[1:])])
    assert (delta.text, delta.tokens, delta.logprobs) == ("abc", 3, lp)
    assert merge([Piece("x", 2), Piece("y", 1)]).logprobs is None
