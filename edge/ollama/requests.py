"""``/api/chat`` and ``/api/generate`` bodies; ``stream`` defaults to true, as in Ollama."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.jobs import MAX_MESSAGES, MAX_STOP, MAX_STOP_CHARS, SEED_MAX


class Lenient(BaseModel):
    """Unknown fields (keep_alive, think, tools ...) are ignored."""

    model_config = ConfigDict(extra="ignore")


class Options(Lenient):
    """The sampling ``options`` Ollama clients send (llama.cpp's names)."""

    temperature: float = Field(default=0.8, ge=0.0, le=2.0)
    top_p: float = Field(default=0.9, ge=0.0, le=1.0)
    top_k: int = Field(default=40, ge=0, le=1000)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    typical_p: float = Field(default=1.0, ge=0.0, le=1.0)
    repeat_penalty: float = Field(default=1.1, ge=0.0, le=10.0)
    repeat_last_n: int = Field(default=64, ge=-1)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    mirostat: Literal[0, 1, 2] = 0
    mirostat_tau: float = Field(default=5.0, ge=0.0)
    mirostat_eta: float = Field(default=0.1, ge=0.0)
    seed: int | None = Field(default=None, ge=-1, le=SEED_MAX)
    stop: Annotated[
        list[Annotated[str, Field(max_length=MAX_STOP_CHARS)]], Field(max_length=MAX_STOP)
    ] = []
    num_predict: int = Field(default=-1, ge=-2)


class Message(Lenient):
    """One chat message."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""


class Common(Lenient):
    """Fields of both routes."""

    model: str = Field(min_length=1, max_length=256)
    stream: bool = True
    format: Literal["json"] | dict[str, Any] | None = None
    options: Options = Options()


class ChatRequest(Common):
    """``POST /api/chat``."""

    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]


class GenerateRequest(Common):
    """``POST /api/generate``: the prompt goes through the model's template unless ``raw``."""

    prompt: str
    system: str | None = None
    raw: bool = False
