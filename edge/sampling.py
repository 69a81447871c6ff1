"""The bounds of the sampling values the text APIs (OpenAI, llama.cpp, Ollama) accept, once.

Each API keeps its own default on its own field, because the APIs differ (temperature
1.0 / 0.8 / 0.8, top_p 1.0 / 0.95 / 0.9, min_p 0.05 / 0.05 / 0.0 ...): a field reads
``top_p: TopP = 0.95``. These are annotated types rather than a mixin of fields because a
mixin's fields come first in every model that uses it, which would change which problem an
invalid body reports first and the order of the OpenAPI schemas.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

Temperature = Annotated[float, Field(ge=0.0, le=2.0)]
TopP = Annotated[float, Field(ge=0.0, le=1.0)]
TopK = Annotated[int, Field(ge=0, le=1000)]
MinP = Annotated[float, Field(ge=0.0, le=1.0)]
TypicalP = Annotated[float, Field(ge=0.0, le=1.0)]
RepeatPenalty = Annotated[float, Field(ge=0.0, le=10.0)]
RepeatLastN = Annotated[int, Field(ge=-1)]
# presence_penalty and frequency_penalty, as OpenAI bounds them
Penalty = Annotated[float, Field(ge=-2.0, le=2.0)]
# mirostat_tau and mirostat_eta
MirostatRate = Annotated[float, Field(ge=0.0)]
Grammar = Annotated[str, Field(max_length=100_000)]
