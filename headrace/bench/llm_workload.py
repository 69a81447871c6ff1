"""The LLM benchmark's workload (prompts, seeds, sampling) and its closed-loop driver.

Every path of ``headrace bench llm`` runs exactly this: request ``k`` asks for
prompt ``k % len(prompts)`` with seed ``seed + k % len(prompts)``, so a prompt
always comes with the same seed and should give the same text on every path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from headrace.bench.common import progress

PROMPTS = (
    "Write a long story about a lighthouse keeper who talks to the sea.",
    "Explain how a bicycle stays upright, step by step.",
    "List ten ideas for a rainy weekend and say why each one is fun.",
    "Describe the water cycle to a ten-year-old.",
    "Write a letter from a cat to its owner about breakfast.",
    "What are the pros and cons of living in a big city?",
    "Give a recipe for pancakes and explain each step.",
    "Invent the plot of a heist movie and tell it in detail.",
)
# Sent explicitly everywhere: llama_cpp.server's and headrace's defaults differ in places.
SAMPLING: dict[str, Any] = {
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.95,
    "min_p": 0.05,
    "repeat_penalty": 1.0,
}


@dataclass(frozen=True, kw_only=True)
class Workload:
    """What every path is asked to do, and the llama.cpp settings every path uses."""

    model_id: str
    model_path: str
    prompts: tuple[str, ...] = PROMPTS
    max_tokens: int = 64
    seed: int = 42
    levels: tuple[int, ...] = (1, 4, 16)
    rounds: int = 2  # requests per level: max(prompts, rounds x concurrency)
    warmup: int = 2
    n_ctx: int = 2048
    threads: int = 2

    def requests(self, concurrency: int) -> int:
        """How many requests one concurrency level sends."""
        return max(len(self.prompts), self.rounds * concurrency)

    def prompt_of(self, k: int) -> int:
        """The prompt index of request ``k``."""
        return k % len(self.prompts)

    def messages(self, k: int) -> list[dict[str, str]]:
        """Request ``k``'s chat messages."""
        return [{"role": "user", "content": self.prompts[self.prompt_of(k)]}]

    def seed_of(self, k: int) -> int:
        """Request ``k``'s seed (one per prompt)."""
        return self.seed + self.prompt_of(k)

    def chat_body(self, k: int) -> dict[str, Any]:
        """Request ``k`` as an OpenAI streaming chat completion body."""
        return {
            "model": self.model_id,
            "messages": self.messages(k),
            "max_tokens": self.max_tokens,
            "seed": self.seed_of(k),
            "stream": True,
            **SAMPLING,
        }

    def to_json(self) -> dict[str, Any]:
        """The workload as JSON (for the in-process child and the results file)."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Workload:
        """The inverse of ``to_json``."""
        return cls(**{**data, "prompts": tuple(data["prompts"]), "levels": tuple(data["levels"])})


@dataclass(kw_only=True)
class Sample:
    """One request: when its text arrived (seconds from the start of its level) and how it ended."""

    request: int
    prompt: int
    start_s: float
    first_s: float | None = None
    last_s: float | None = None
    text: str = ""
    finish: str | None = None  # None without an error: the stream ended early (cut short)
    error: str | None = None
    parts: list[str] = field(default_factory=list, repr=False)

    def piece(self, text: str, now_s: float) -> None:
        """Record a piece of generated text."""
        if text:
            self.first_s = now_s if self.first_s is None else self.first_s
            self.last_s = now_s
            self.parts.append(text)

    def close(self) -> Sample:
        """Join the pieces into ``text``."""
        self.text = "".join(self.parts)
        self.parts = []
        return self

    def to_json(self) -> dict[str, Any]:
        """The sample as JSON."""
        data = asdict(self)
        del data["parts"]
        return data


@dataclass(kw_only=True)
class Level:
    """One concurrency level of one path."""

    concurrency: int
    wall_s: float
    samples: list[Sample]

    def to_json(self) -> dict[str, Any]:
        """The level as JSON."""
        return {
            "concurrency": self.concurrency,
            "wall_s": self.wall_s,
            "samples": [s.to_json() for s in self.samples],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Level:
        """The inverse of ``to_json``."""
        return cls(
            concurrency=data["concurrency"],
            wall_s=data["wall_s"],
            samples=[Sample(**s) for s in data["samples"]],
        )


OneRequest = Callable[[int, float], Awaitable[Sample]]


async def closed_loop(concurrency: int, count: int, one: OneRequest, label: str) -> Level:
    """``concurrency`` clients send ``count`` requests, each sending its next when one ends."""
    t0 = time.perf_counter()
    next_k = 0
    samples: list[Sample] = []

    async def client() -> None:
        nonlocal next_k
        while next_k < count:
            k, next_k = next_k, next_k + 1
            samples.append(await one(k, t0))
            progress(label, len(samples), count)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    wall_s = time.perf_counter() - t0
    return Level(
        concurrency=concurrency, wall_s=wall_s, samples=sorted(samples, key=lambda s: s.request)
    )


async def run_levels(workload: Workload, one: OneRequest, name: str) -> list[Level]:
    """Warm up (not reported), then every concurrency level in turn."""
    await closed_loop(1, workload.warmup, one, f"{name}: warm-up")
    levels = []
    for concurrency in workload.levels:
        count = workload.requests(concurrency)
        levels.append(await closed_loop(concurrency, count, one, f"{name}: x{concurrency}"))
    return levels
