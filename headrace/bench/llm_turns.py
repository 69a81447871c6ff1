"""``headrace bench llm``'s multi-turn part: an NPC conversation, its history resent each turn.

A game character (a ~400-token persona as the system prompt) talks with a player for 6
turns; each turn sends the whole conversation so far plus the player's next line, as
LLMUnity and any chat client do. A server that keeps the previous turn's KV cells
evaluates only the new tail; one that does not re-evaluates the whole history, and its
time to first token grows turn by turn. Measured per turn, one conversation at a time:

* llama.cpp's ``llama-server -np 1`` with ``cache_prompt: true`` (its default) and with
  ``cache_prompt: false`` (when ``make llama-server`` has built it);
* headrace through the edge with 1 slot, on ``/v1/chat/completions`` with
  ``cache_prompt: true`` in the body (LLMUnity sends it on ``/completion``; the chat route
  takes the same field, so both servers apply the GGUF's chat template themselves);
* llama_cpp.server with its prompt cache (``--cache True``; not with ``--quick``).

Each conversation starts with a line naming the player, different in every conversation,
so no server finds the first turn in a cache. It writes ``llm-turns.{json,md,png}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from headrace.bench.common import pass_order, percentile, progress, pyplot, write_outputs
from headrace.bench.llm_http import client, stream_chat
from headrace.bench.llm_servers import (
    Serving,
    headrace_served,
    llama_cpp_server_argv,
    llama_server_argv,
    served,
)
from headrace.bench.llm_workload import SAMPLING, Sample

PERSONA = """\
You are Maren Holt, the blacksmith of Ashford, a small village at the edge of the Greywood \
forest. You are fifty-two years old, broad-shouldered, with burn scars on both forearms and \
a short grey beard. You speak plainly and warmly, in short sentences, and you never use \
modern words. You have run the forge by the river for thirty years, since your father Tomas \
died. Your wife Ilse keeps bees; your daughter Wren is apprenticed to a herbalist.

What you know about the world: Ashford has about two hundred people, one inn called the \
Crooked Lantern, a mill, and a chapel with a cracked bell. The old silver mine in the hills above the village was closed ten years ago after a collapse \
killed six miners. Since the spring, villagers have heard knocking from the mine at night, \
and two sheep have gone missing. The hunter Oswin says he saw green lights between the \
trees. You do not believe in ghosts, but you have started sleeping with a hammer by the bed.

What you sell: horseshoes (two silver each), knives (five silver), axes (twelve silver), \
and you repair armour. A good steel sword takes three days and costs thirty silver; a fine \
one takes five days and costs fifty. You will lower a price for someone who helps the \
village, but never below two thirds of it.

How you behave: you are curious about travellers and ask where they come from. If asked \
about the mine, you tell what you know \
and advise going in daylight with a lantern, rope and a friend. You will not go into the \
mine yourself, because your knee was crushed there in the collapse, but you can lend a good \
pick. If someone is rude, you answer shortly and go back to your work. Stay in character: \
never say you are an AI, never mention these instructions, and answer in two to four \
sentences."""

PLAYER_LINES = (
    "Good morning! Are you the blacksmith everyone in the inn talks about?",
    "I need a sword that will not break on my first fight. What can you make for me?",
    "That is more than I have. I only carry forty silver coins. Can we agree on a price?",
    "People at the inn whisper about the old mine. What is going on up there?",
    "Would you come with me to the mine tomorrow morning? I could use a strong arm.",
    "Thank you for the advice. What should I bring, and when will the sword be ready?",
)
PLAYERS = ("Arlen", "Bryn", "Cato", "Dessa", "Evander", "Fenna", "Gideon", "Hale", "Isolde",
           "Joren", "Kestrel", "Lio")  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class TurnsWorkload:
    """The conversations every system is sent, and the settings every system runs with."""

    model_id: str
    model_path: str
    turns: int = len(PLAYER_LINES)
    conversations: int = 2  # per system and pass
    passes: int = 2  # every system in turn, once per pass
    max_tokens: int = 48
    seed: int = 7
    n_ctx: int = 2048
    threads: int = 2

    def __post_init__(self) -> None:
        if not 1 <= self.turns <= len(PLAYER_LINES):
            raise ValueError(f"turns must be 1..{len(PLAYER_LINES)}, not {self.turns}")

    def system_prompt(self, conversation: int) -> str:
        """The persona, after a first line that differs in every conversation."""
        player = PLAYERS[conversation % len(PLAYERS)]
        return f"Conversation {conversation}: the traveller before you is {player}.\n{PERSONA}"

    def messages(
        self, conversation: int, history: list[dict[str, str]], turn: int
    ) -> list[dict[str, str]]:
        """What turn ``turn`` sends: the system prompt, the history, the player's next line."""
        return [
            {"role": "system", "content": self.system_prompt(conversation)},
            *history,
            {"role": "user", "content": PLAYER_LINES[turn]},
        ]

    def body(
        self, messages: list[dict[str, str]], turn: int, cache_prompt: bool | None
    ) -> dict[str, Any]:
        """One turn as a streaming chat completion (``cache_prompt`` left out when None)."""
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": messages,
            "max_tokens": self.max_tokens,
            "seed": self.seed + turn,
            "stream": True,
            **SAMPLING,
        }
        if cache_prompt is not None:
            body["cache_prompt"] = cache_prompt
        return body

    def serving(self) -> Serving:
        """The server settings of every system."""
        return Serving(
            model_id=self.model_id, model_path=self.model_path, n_ctx=self.n_ctx,
            threads=self.threads,
        )  # fmt: skip


@dataclass(kw_only=True)
class Turn:
    """One turn of one conversation: its time to first token and what came back."""

    conversation: int
    turn: int
    ttft_ms: float | None
    total_ms: float
    text: str
    finish: str | None
    error: str | None
    messages: list[dict[str, str]] = field(repr=False)


async def converse(
    http: aiohttp.ClientSession, url: str, workload: TurnsWorkload, conversation: int,
    cache_prompt: bool | None, turns: int | None = None,
) -> list[Turn]:  # fmt: skip
    """One conversation: each turn resends the history, the reply is appended to it."""
    history: list[dict[str, str]] = []
    done = []
    for turn in range(workload.turns if turns is None else turns):
        messages = workload.messages(conversation, history, turn)
        sample = Sample(request=turn, prompt=turn, start_s=0.0)
        t0 = time.perf_counter()
        await stream_chat(http, url, workload.body(messages, turn, cache_prompt), sample, t0)
        done.append(Turn(
            conversation=conversation, turn=turn + 1, total_ms=(time.perf_counter() - t0) * 1000,
            ttft_ms=None if sample.first_s is None else sample.first_s * 1000,
            text=sample.text, finish=sample.finish, error=sample.error, messages=messages,
        ))  # fmt: skip
        if sample.error:
            break  # the history would lack this reply
        history += [messages[-1], {"role": "assistant", "content": sample.text}]
    return done


Serve = Callable[[TurnsWorkload, Path], AbstractContextManager[tuple[str, dict[str, str]]]]


@dataclass(frozen=True, kw_only=True)
class System:
    """One server and the ``cache_prompt`` its requests carry."""

    key: str
    label: str
    serve: Serve
    cache_prompt: bool | None
    quick: bool = True


def _command(argv: Callable[[Serving, int], list[str]], name: str) -> Serve:
    @contextlib.contextmanager
    def serve(workload: TurnsWorkload, tmp: Path) -> Iterator[tuple[str, dict[str, str]]]:
        serving = workload.serving()
        log = tmp / f"{name}.log"
        with served(lambda port: argv(serving, port), workload.model_id, log) as base:
            yield base, {}

    return serve


def _headrace(
    workload: TurnsWorkload, tmp: Path
) -> AbstractContextManager[tuple[str, dict[str, str]]]:
    return headrace_served(workload.serving(), slots=1, threads=workload.threads)


def systems(peer: Path | None, peer_args: tuple[str, ...] = ()) -> list[System]:
    """Every system, in the order they run (llama-server's rows only where it is built)."""
    rows = []
    if peer is not None:
        binary = peer

        def np1(s: Serving, port: int) -> list[str]:
            return llama_server_argv(binary, s, port, 1, peer_args)

        rows += [
            System(key="llama-server-cache", label="llama-server -np 1, cache_prompt on "
                   "(its default)", serve=_command(np1, "llama-server"), cache_prompt=True),
            System(key="llama-server-no-cache", label="llama-server -np 1, cache_prompt off",
                   serve=_command(np1, "llama-server"), cache_prompt=False),
        ]  # fmt: skip
    rows += [
        System(key="headrace", label="headrace through the edge, 1 slot (cache_prompt: true)",
               serve=_headrace, cache_prompt=True),
        System(key="llama_cpp.server-cache", label="llama_cpp.server --cache True",
               serve=_command(lambda s, port: llama_cpp_server_argv(
                   s, port, ("--interrupt_requests", "False", "--cache", "True")),
                   "llama_cpp.server"), cache_prompt=None, quick=False),
    ]  # fmt: skip
    return rows


@dataclass(frozen=True, kw_only=True)
class TurnsOptions:
    """What the multi-turn benchmark runs."""

    workload: TurnsWorkload
    systems: tuple[System, ...]


def options_from(options: Any, threads: int, peer: Path | None) -> TurnsOptions:
    """The multi-turn run that goes with ``headrace bench llm``'s options (``llm.Options``)."""
    from workers.engines.gguf import DEFAULT_MODEL_ID, bundled_gguf

    quick = bool(options.quick)
    workload = TurnsWorkload(
        model_id=DEFAULT_MODEL_ID, model_path=str(bundled_gguf()), threads=threads,
        turns=3 if quick else len(PLAYER_LINES), conversations=1 if quick else 2,
        passes=options.passes or (1 if quick else 2), max_tokens=16 if quick else 48,
    )  # fmt: skip
    rows = [s for s in systems(peer, tuple(options.peer_args)) if s.quick or not quick]
    return TurnsOptions(workload=workload, systems=tuple(rows))


async def _conversations(
    base: str, headers: dict[str, str], workload: TurnsWorkload, system: System, first: int
) -> list[Turn]:
    url = f"{base}/v1/chat/completions"
    async with client(headers) as http:
        # Warm-up: one turn of a conversation of its own (its name shares no prefix).
        await converse(http, url, workload, 10_000 + first, system.cache_prompt, turns=1)
        turns: list[Turn] = []
        total = workload.conversations * workload.turns
        for conversation in range(first, first + workload.conversations):
            turns += await converse(http, url, workload, conversation, system.cache_prompt)
            progress(system.key, len(turns), total)
        return turns


def run_systems(options: TurnsOptions) -> dict[str, list[Turn]]:
    """Every system once per pass, one at a time, every other pass in reverse order
    (``pass_order``); each pass has conversations of its own."""
    workload, rows = options.workload, options.systems
    turns: dict[str, list[Turn]] = {s.key: [] for s in rows}
    with tempfile.TemporaryDirectory(prefix="headrace-bench-turns-") as tmp:
        for n in range(workload.passes):
            for i, system in enumerate(pass_order(rows, n), 1):
                print(f"[turns, pass {n + 1}/{workload.passes}, {i}/{len(rows)}] "
                      f"{system.label}", file=sys.stderr)  # fmt: skip
                with system.serve(workload, Path(tmp)) as (base, headers):
                    first = n * workload.conversations
                    turns[system.key] += asyncio.run(
                        _conversations(base, headers, workload, system, first)
                    )
    return turns


class PromptCounter:
    """Tokens of a turn's prompt: its messages through the GGUF's chat template."""

    def __init__(self, model_path: str) -> None:
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        from workers.engines.gguf import route_native_logs

        route_native_logs()
        self._vocab = llama_cpp.Llama(model_path=model_path, vocab_only=True, verbose=False)
        special = self._vocab.detokenize
        self._format = Jinja2ChatFormatter(
            self._vocab.metadata["tokenizer.chat_template"],
            eos_token=special([self._vocab.token_eos()], special=True).decode(),
            bos_token=special([self._vocab.token_bos()], special=True).decode(),
        )

    def __call__(self, messages: list[dict[str, str]]) -> int:
        prompt = self._format(messages=messages).prompt  # type: ignore[arg-type]
        return len(self._vocab.tokenize(prompt.encode(), add_bos=False, special=True))


def summarize(options: TurnsOptions, turns: dict[str, list[Turn]]) -> dict[str, Any]:
    """Per system and turn: TTFT p50, min and max over the conversations, prompt tokens."""
    count = PromptCounter(options.workload.model_path)
    out = []
    for system in options.systems:
        mine = turns[system.key]
        per_turn: list[dict[str, Any]] = []
        for t in range(1, options.workload.turns + 1):
            at = [x for x in mine if x.turn == t]
            ttft = [x.ttft_ms for x in at if x.ttft_ms is not None]
            per_turn.append({
                "turn": t, "conversations": len(at),
                "errors": sum(1 for x in at if x.error),
                "ttft_p50_ms": percentile(ttft, 50) if ttft else None,
                "ttft_min_ms": min(ttft, default=None), "ttft_max_ms": max(ttft, default=None),
                "prompt_tokens": [count(x.messages) for x in at],
            })  # fmt: skip
        later = [p["ttft_p50_ms"] for p in per_turn[1:] if p["ttft_p50_ms"] is not None]
        out.append({
            "key": system.key, "label": system.label, "cache_prompt": system.cache_prompt,
            "turns": per_turn,
            "later_turns_mean_ms": sum(later) / len(later) if later else None,
            "later_turns_mean_ms_passes": _later_by_pass(options.workload, mine),
            "conversations": [{**asdict(x), "messages": None} for x in mine],
        })  # fmt: skip
    return {
        "workload": asdict(options.workload), "systems": out, "versus_peer": _versus_peer(out),
    }  # fmt: skip


def _later_by_pass(workload: TurnsWorkload, turns: list[Turn]) -> list[float | None]:
    """Each pass's mean TTFT over turns 2 on (pass n holds conversations n x conversations on)."""
    means: list[float | None] = []
    for n in range(workload.passes):
        ttft = [
            t.ttft_ms for t in turns
            if t.turn > 1 and t.ttft_ms is not None and t.conversation // workload.conversations == n
        ]  # fmt: skip
        means.append(sum(ttft) / len(ttft) if ttft else None)
    return means


def _versus_peer(systems: list[dict[str, Any]]) -> dict[str, Any] | None:
    """headrace over llama-server with its cache, turns 2 on, pass by pass: both ran in each
    pass, so the VM's drift between passes cancels in each ratio."""
    by_key = {s["key"]: s for s in systems}
    if "headrace" not in by_key or "llama-server-cache" not in by_key:
        return None
    pairs = zip(
        by_key["headrace"]["later_turns_mean_ms_passes"],
        by_key["llama-server-cache"]["later_turns_mean_ms_passes"],
        strict=True,
    )
    ratios = [a / b for a, b in pairs if a is not None and b]
    return {"ratios": ratios, "median": statistics.median(ratios)} if ratios else None


def _cell(p: dict[str, Any]) -> str:
    if p["ttft_p50_ms"] is None:
        return f"- ({p['errors']} errors)" if p["errors"] else "-"
    spread = f" ({p['ttft_min_ms']:.0f}-{p['ttft_max_ms']:.0f})" if p["conversations"] > 1 else ""
    return f"{p['ttft_p50_ms']:.0f}{spread}" + (f", {p['errors']} errors" if p["errors"] else "")


def table(result: dict[str, Any]) -> str:
    """Time to first token per turn, one row per system, and the prompt sizes."""
    turns = result["workload"]["turns"]
    head = " | ".join(f"turn {t}" for t in range(1, turns + 1))
    lines = [
        f"| system | {head} | turns 2-{turns}, mean |",
        "|---|" + "---|" * (turns + 1),
    ]
    for s in result["systems"]:
        cells = " | ".join(_cell(p) for p in s["turns"])
        later = s["later_turns_mean_ms"]
        lines.append(f"| {s['label']} | {cells} | **{'-' if later is None else f'{later:.0f}'}** |")
    paired = result.get("versus_peer")
    if paired:
        each = ", ".join(f"{r:.2f}" for r in paired["ratios"])
        lines += [
            "",
            "headrace / llama-server with its cache, mean TTFT of turns 2 on, pass by pass: "
            f"**{paired['median']:.2f}** (median; each pass {each}; goal <= 1.0).",
        ]
    lines += [
        "",
        "Time to first token (ms) per turn: p50 over the conversations (min-max), from "
        "sending the request to the first chunk with text. Prompt tokens per turn (first "
        "conversation, the chat template applied):",
        "",
    ]
    for s in result["systems"]:
        sizes = ", ".join(str(p["prompt_tokens"][0]) if p["prompt_tokens"] else "-"
                          for p in s["turns"])  # fmt: skip
        lines.append(f"* {s['label']}: {sizes}")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: Path) -> bool:
    """TTFT p50 per turn with its min-max band, one line per system (False without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for s in result["systems"]:
        pts = [p for p in s["turns"] if p["ttft_p50_ms"] is not None]
        xs = [p["turn"] for p in pts]
        (line,) = ax.plot(xs, [p["ttft_p50_ms"] for p in pts], marker="o", label=s["label"])
        ax.fill_between(xs, [p["ttft_min_ms"] for p in pts], [p["ttft_max_ms"] for p in pts],
                        color=line.get_color(), alpha=0.15)  # fmt: skip
    ax.set_yscale("log")
    ax.set_xticks(range(1, result["workload"]["turns"] + 1))
    ax.set_xlabel("turn (each resends the whole conversation)")
    ax.set_ylabel("time to first token, p50 (ms)")
    ax.set_title(f"{result['workload']['turns']}-turn NPC conversation, ~400-token persona, "
                 f"{result['workload']['threads']} llama.cpp threads", fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def run(out: Path, options: TurnsOptions) -> int:
    """Run every system's conversations; print the table; write ``llm-turns.{json,md,png}``."""
    w = options.workload
    print(
        f"headrace bench llm, multi-turn: {w.conversations} conversation(s) of {w.turns} turns "
        f"per system and pass, max_tokens {w.max_tokens}, {w.passes} pass(es), "
        f"{len(options.systems)} systems",
        file=sys.stderr,
    )
    result = summarize(options, run_systems(options))
    write_outputs(out, "llm-turns", result, table(result), plot)
    return 1 if any(p["errors"] for s in result["systems"] for p in s["turns"]) else 0
