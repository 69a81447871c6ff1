"""Embedding request bodies of the three API families, each turned into one ``EmbedParams``.

Inputs, as the APIs spell them: OpenAI's ``input`` is a string, a list of strings, a list
of token ids (one input) or a list of token-id lists; llama.cpp's ``content`` (or
``input``) takes the same shapes; Ollama's ``input`` is a string or a list of strings,
its older ``/api/embeddings`` one ``prompt``. The edge bounds what it can without a
tokenizer; the worker tokenizes and checks every input against the model's context.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, StrictBool, StrictInt, StrictStr, ValidationError

from edge.body import Lenient, invalid
from schemas.errors import InvalidRequest
from schemas.jobs import MAX_EMBED_INPUTS, MAX_PROMPT_CHARS, EmbedParams

Tokens = list[Annotated[StrictInt, Field(ge=0)]]
# A string, token ids, or a list of either (strings and token lists may be mixed, as
# llama.cpp's server allows).
Input = StrictStr | Tokens | list[StrictStr | Tokens]
Normalize = Annotated[StrictInt, Field(ge=-1, le=16)]


def inputs_of(value: Input, param: str) -> list[str | list[int]]:
    """The separate inputs of an ``input`` value: a flat list of ints is one input."""
    ids = [v for v in value if isinstance(v, int)] if isinstance(value, list) else []
    if isinstance(value, str):
        items: list[str | list[int]] = [value]
    elif ids and len(ids) == len(value):
        items = [ids]
    elif ids:
        raise InvalidRequest(
            f"'{param}' mixes token ids with other inputs: give a list of token-id lists",
            param=param,
        )
    else:
        items = [v for v in value if not isinstance(v, int)]
    if not items:
        raise InvalidRequest(f"'{param}' must not be empty", param=param)
    if len(items) > MAX_EMBED_INPUTS:
        raise InvalidRequest(
            f"'{param}' holds {len(items)} inputs; at most {MAX_EMBED_INPUTS} are accepted",
            param=param,
        )
    for i, item in enumerate(items):
        if isinstance(item, list) and not item:
            raise InvalidRequest(f"input {i} is an empty list of tokens", param=param)
    return items


def _params(param: str, **fields: Any) -> EmbedParams:
    """The job's parameters; what the job's own bounds refuse is a 400 naming ``param``."""
    try:
        return EmbedParams(**fields)
    except ValidationError as e:
        raise InvalidRequest(invalid(e).message, param=param) from None


def chars_of(inputs: list[str | list[int]]) -> int:
    """What the prompt bound counts: characters of text, four per token id."""
    return sum(len(i) if isinstance(i, str) else 4 * len(i) for i in inputs)


class OpenAIEmbeddingRequest(Lenient):
    """``POST /v1/embeddings``; ``embd_normalize`` is llama.cpp's extension of it."""

    model: str = Field(min_length=1, max_length=256)
    input: Input
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: StrictInt | None = Field(default=None, ge=1)
    user: str | None = None
    embd_normalize: Normalize = 2

    def job_params(self) -> EmbedParams:
        """The job's parameters (an empty string is an input: the tokenizer decides)."""
        return _params(
            "input",
            inputs=inputs_of(self.input, "input"),
            normalize=self.embd_normalize,
            dimensions=self.dimensions,
        )


class LlamaCppEmbeddingRequest(Lenient):
    """``POST /embedding`` and ``/embeddings``: ``content`` (LLMUnity's) or ``input``."""

    content: Input | None = None
    input: Input | None = None
    model: str | None = Field(default=None, max_length=256)
    embd_normalize: Normalize = 2

    @property
    def single(self) -> bool:
        """LLMUnity's request: one ``content`` string, answered ``{"embedding": [...]}``."""
        return self.input is None and isinstance(self.content, str)

    def job_params(self) -> EmbedParams:
        """The job's parameters; ``input`` wins when both are given, as in llama.cpp."""
        value = self.input if self.input is not None else self.content
        param = "input" if self.input is not None else "content"
        if value is None:
            raise InvalidRequest('"input" or "content" must be provided', param="content")
        return _params(param, inputs=inputs_of(value, param), normalize=self.embd_normalize)


class OllamaEmbedRequest(Lenient):
    """``POST /api/embed``: Ollama truncates inputs that are too long unless told not to."""

    model: str = Field(min_length=1, max_length=256)
    input: StrictStr | list[StrictStr] = Field(default="")
    truncate: StrictBool = True
    dimensions: StrictInt | None = Field(default=None, ge=1)
    options: dict[str, Any] | None = None
    keep_alive: Any = None

    def texts(self) -> list[str]:
        """The non-empty inputs (Ollama skips an empty string; none at all loads the model)."""
        items = [self.input] if isinstance(self.input, str) else list(self.input)
        return [t for t in items if t]

    def job_params(self, texts: list[str]) -> EmbedParams:
        """The job's parameters (Ollama's vectors are L2-normalized)."""
        if len(texts) > MAX_EMBED_INPUTS:
            raise InvalidRequest(
                f"'input' holds {len(texts)} inputs; at most {MAX_EMBED_INPUTS} are accepted",
                param="input",
            )
        return _params("input", inputs=texts, truncate=self.truncate, dimensions=self.dimensions)


class OllamaEmbeddingsRequest(Lenient):
    """``POST /api/embeddings`` (Ollama's older route): one ``prompt``, a raw vector."""

    model: str = Field(min_length=1, max_length=256)
    prompt: StrictStr = Field(default="", max_length=MAX_PROMPT_CHARS)
    options: dict[str, Any] | None = None
    keep_alive: Any = None

    def job_params(self) -> EmbedParams:
        """Ollama's older route does not normalize its vector."""
        return _params("prompt", inputs=[self.prompt], normalize=-1)
