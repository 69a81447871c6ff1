"""Text inside llama.cpp's prompts and ``logit_bias`` pieces, turned into token ids.

The edge has no tokenizer, so it asks a worker of the model (its ``tokenize`` RPC) and
jobs carry ids only: a worker never sees a form it would have to guess at, and the job
contract stays ``str | list[int]``. Only requests that use these forms pay the round trip.
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from edge import rpc
from edge.llamacpp.requests import Biases, Prompt
from schemas.errors import InvalidRequest


async def _tokens(
    request: web.Request, model: str, text: str, *, special: bool, first: bool
) -> list[int]:
    answer = await rpc.call(
        request, model, "tokenize",
        {"content": text, "add_special": first, "parse_special": special},
    )  # fmt: skip
    tokens = answer.get("tokens")
    if not isinstance(tokens, list) or not all(isinstance(t, int) for t in tokens):
        raise InvalidRequest(f"the workers of '{model}' cannot tokenize", param="prompt")
    return tokens


async def job_prompt(request: web.Request, model: str, prompt: Prompt) -> str | list[int]:
    """A prompt as a job takes it: text stays text; ids mixed with strings become ids.

    As llama.cpp's tokenize_mixed: a string that opens the prompt gets the BOS token, later
    ones do not, and special tokens written out in them are read as such.
    """
    if isinstance(prompt, str) or all(isinstance(t, int) for t in prompt):
        return prompt  # type: ignore[return-value]
    parts = await asyncio.gather(*(
        _tokens(request, model, t, special=True, first=i == 0) if isinstance(t, str) else _id(t)
        for i, t in enumerate(prompt)
    ))  # fmt: skip
    return [t for part in parts for t in part]


async def _id(token: int) -> list[int]:
    return [token]


async def resolve_biases(request: web.Request, model: str, biases: Biases) -> Biases:
    """Every text piece as the tokens it is made of, each given the piece's bias (llama.cpp
    tokenizes a piece without BOS and without reading special tokens)."""
    if not biases.pieces:
        return biases
    out = Biases(dict(biases.ids))
    tokenized = await asyncio.gather(*(
        _tokens(request, model, piece, special=False, first=False) for piece, _ in biases.pieces
    ))  # fmt: skip
    for (_, bias), tokens in zip(biases.pieces, tokenized, strict=True):
        for t in tokens:
            out.add(t, bias)
    return out
