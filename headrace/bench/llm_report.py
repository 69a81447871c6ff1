"""``headrace bench llm``'s figures: per-level summaries, the headline ratio, a table and a plot."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from headrace.bench.common import percentile, pyplot
from headrace.bench.llm_workload import Level, Sample

BASELINE = "in-process"  # the ceiling every other path is compared with
HEADLINE = "headrace"  # headrace through the edge, one slot: the goal is >= 0.97


def summarize(
    level: Level, tokens: Callable[[str], int], reference: dict[int, str]
) -> dict[str, Any]:
    """TTFT, tokens per second, outcomes and overlap of one concurrency level."""
    samples = level.samples
    done = [s for s in samples if s.error is None and s.finish is not None]
    counts = {s.request: tokens(s.text) for s in samples}
    ttft = [(s.first_s - s.start_s) * 1000 for s in samples if s.first_s is not None]
    streams = [_stream_tps(s, counts[s.request]) for s in done]
    rates = [r for r in streams if r is not None]
    total = sum(counts.values())
    errors = [s.error for s in samples if s.error is not None]
    return {
        "requests": len(samples),
        "completed": len(done),
        "cut_short": sum(1 for s in samples if s.error is None and s.finish is None),
        "cut_short_empty": sum(
            1 for s in samples if s.error is None and s.finish is None and not s.text
        ),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "ttft_p50_ms": percentile(ttft, 50) if ttft else None,
        "ttft_p95_ms": percentile(ttft, 95) if ttft else None,
        "stream_tps_p50": percentile(rates, 50) if rates else None,
        "aggregate_tps": total / level.wall_s,
        "output_tokens": total,
        "wall_s": level.wall_s,
        "same_text": sum(1 for s in done if reference.get(s.prompt) == s.text),
        "max_streaming_at_once": _max_overlap(samples),
    }


def _stream_tps(sample: Sample, count: int) -> float | None:
    """Tokens per second of one stream once its first token arrived."""
    if sample.first_s is None or sample.last_s is None or count < 2:
        return None
    span = sample.last_s - sample.first_s
    return (count - 1) / span if span > 0 else None


def _max_overlap(samples: list[Sample]) -> int:
    """The most streams that were between their first and last chunk at the same moment."""
    edges = sorted(
        (t, step)
        for s in samples
        if s.first_s is not None and s.last_s is not None
        for t, step in ((s.first_s, 1), (s.last_s, -1))
    )
    at_once = most = 0
    for _, step in edges:
        at_once += step
        most = max(most, at_once)
    return most


def behaviour(summary: dict[str, Any]) -> str:
    """What a path did with concurrent requests, in words, from the figures."""
    words = []
    if summary["max_streaming_at_once"] <= 1:
        words.append("serialized: one stream at a time, the others waited")
    else:
        words.append(f"up to {summary['max_streaming_at_once']} streams at once")
    if summary["cut_short"]:
        words.append(
            f"{summary['cut_short']} of {summary['requests']} streams cut short (ended "
            f"without a finish_reason), {summary['cut_short_empty']} of them before any text"
        )
    if summary["errors"]:
        words.append(f"{summary['errors']} errors, first: {summary['first_error']}")
    return "; ".join(words)


def headline(paths: list[dict[str, Any]]) -> dict[str, Any] | None:
    """headrace end to end / in-process at concurrency 1: tokens/s ratios and the TTFT gap."""
    by_key = {p["key"]: p for p in paths}
    if BASELINE not in by_key or HEADLINE not in by_key:
        return None
    base, ours = (_level(by_key[k], 1) for k in (BASELINE, HEADLINE))
    if base is None or ours is None:
        return None
    return {
        "aggregate_tps_ratio": ours["aggregate_tps"] / base["aggregate_tps"],
        "stream_tps_ratio": _ratio(ours["stream_tps_p50"], base["stream_tps_p50"]),
        "ttft_p50_diff_ms": _diff(ours["ttft_p50_ms"], base["ttft_p50_ms"]),
        "ttft_p95_diff_ms": _diff(ours["ttft_p95_ms"], base["ttft_p95_ms"]),
        "goal": 0.97,
    }


def _level(path: dict[str, Any], concurrency: int) -> dict[str, Any] | None:
    found = [lv["summary"] for lv in path["levels"] if lv["concurrency"] == concurrency]
    return found[0] if found else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _diff(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def table(result: dict[str, Any]) -> str:
    """The markdown table, the headline and how each path behaved with concurrent requests."""
    lines = [
        "| path | clients | done / cut short / errors | TTFT p50 / p95 (ms) "
        "| tok/s per stream (p50) | tok/s aggregate | same text as in-process | streams at once |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in result["paths"]:
        for lv in path["levels"]:
            s = lv["summary"]
            lines.append(
                f"| {path['label']} | {lv['concurrency']} "
                f"| {s['completed']} / {s['cut_short']} / {s['errors']} "
                f"| {_num(s['ttft_p50_ms'])} / {_num(s['ttft_p95_ms'])} "
                f"| {_num(s['stream_tps_p50'])} | {_num(s['aggregate_tps'])} "
                f"| {s['same_text']}/{s['completed']} | {s['max_streaming_at_once']} |"
            )
    head = result.get("headline")
    if head:
        lines += [
            "",
            f"**Headline (concurrency 1)**: headrace through the edge / in-process = "
            f"**{head['aggregate_tps_ratio']:.3f}** aggregate tokens/s "
            f"({_num(head['stream_tps_ratio'], 3)} per stream; goal >= {head['goal']}); "
            f"TTFT p50 {_signed(head['ttft_p50_diff_ms'])} ms, "
            f"p95 {_signed(head['ttft_p95_diff_ms'])} ms.",
        ]
    lines += [
        "",
        "TTFT and tokens/s per stream count the streams that received text; a stream cut "
        "short before its first token has neither. Tokens/s aggregate: all tokens received "
        "at that level / its wall time.",
        "",
        "How each path handled concurrent clients (at 4, or the highest level run):",
        "",
    ]
    for path in result["paths"]:
        lv = _behaviour_level(path)
        lines.append(
            f"* **{path['label']}** (x{lv['concurrency']}): {behaviour(lv['summary'])}. "
            f"{path['how']}"
        )
    return "\n".join(lines) + "\n"


def _behaviour_level(path: dict[str, Any]) -> dict[str, Any]:
    levels = [lv for lv in path["levels"] if lv["concurrency"] > 1] or path["levels"]
    picked: dict[str, Any] = next((lv for lv in levels if lv["concurrency"] == 4), levels[-1])
    return picked


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


def plot(result: dict[str, Any], path: Path) -> bool:
    """TTFT p50 and tokens/s by concurrency, one line per path (False without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    for p in result["paths"]:
        xs = [lv["concurrency"] for lv in p["levels"]]
        sums = [lv["summary"] for lv in p["levels"]]
        cut, sent = sum(s["cut_short"] for s in sums), sum(s["requests"] for s in sums)
        label = p["label"] + (f" ({cut} of {sent} streams cut short)" if cut else "")
        (line,) = left.plot(xs, [s["ttft_p50_ms"] for s in sums], marker="o", label=label)
        color = line.get_color()
        right.plot(xs, [s["aggregate_tps"] for s in sums], marker="o", color=color)
        right.plot(xs, [s["stream_tps_p50"] for s in sums], marker="x", linestyle="--",
                   color=color, alpha=0.6)  # fmt: skip
    for ax, title in ((left, "time to first token, p50 (ms)"),
                      (right, "output tokens/s: aggregate (solid), per stream p50 (dashed)")):  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["workload"]["levels"], [str(c) for c in result["workload"]["levels"]])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M-Instruct, {result['workload']['threads']} llama.cpp threads, "
                 f"max_tokens {result['workload']['max_tokens']}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
