"""``headrace bench llm``'s figures: per-level summaries, the headline ratio, a table and a plot."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from headrace.bench.common import percentile, pyplot
from headrace.bench.llm_workload import Level, Sample
from workers.settings import TEXT_SLOTS

BASELINE = "in-process"  # the ceiling every other path is compared with
HEADLINE = "headrace"  # headrace through the edge, one slot: the goal is >= 0.97
PEER = "llama-server"  # key prefix of llama.cpp's own server's rows (one per -np)
ENGINE = "engine"  # key prefix of headrace's engine called in-process (one per slot count)
DEFAULT_ROW = f"headrace-{TEXT_SLOTS}-slots"  # headrace as a worker runs with no --slots
PEER_GOAL = {1: 0.95}  # headrace / best peer, aggregate tokens/s; 1.0 at other levels


def summarize(
    passes: list[Level], tokens: Callable[[str], int], reference: dict[int, str]
) -> dict[str, Any]:
    """TTFT, inter-token latency, tokens per second, outcomes and overlap of one level.

    ``passes`` are the runs of the same level in alternating passes: per-request figures
    (TTFT, per-stream rates, ITL) are pooled over them; aggregate tokens/s is all their
    tokens over all their wall time, with each pass's own figure in ``aggregate_tps_passes``.
    """
    samples = [s for lv in passes for s in lv.samples]
    counts = [tokens(s.text) for s in samples]
    done = [(s, n) for s, n in zip(samples, counts, strict=True) if _done(s)]
    ttft = [(s.first_s - s.start_s) * 1000 for s in samples if s.first_s is not None]
    rates = [r for r in (_stream_tps(s, n) for s, n in done) if r is not None]
    itl = [1000 / r for r in rates]  # ms between tokens after the first (aiperf's ITL)
    total, wall_s = sum(counts), sum(lv.wall_s for lv in passes)
    errors = [s.error for s in samples if s.error is not None]
    cut = [s for s in samples if s.error is None and s.finish is None]
    return {
        "requests": len(samples),
        "completed": len(done),
        "cut_short": len(cut),
        "cut_short_empty": sum(1 for s in cut if not s.text),
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "ttft_p50_ms": _pct(ttft, 50),
        "ttft_p95_ms": _pct(ttft, 95),
        "ttft_p99_ms": _pct(ttft, 99),
        "itl_p50_ms": _pct(itl, 50),
        "itl_p99_ms": _pct(itl, 99),
        "stream_tps_p50": _pct(rates, 50),
        "aggregate_tps": total / wall_s,
        "aggregate_tps_passes": [
            sum(tokens(s.text) for s in lv.samples) / lv.wall_s for lv in passes
        ],
        "output_tokens": total,
        "wall_s": wall_s,
        "same_text": sum(1 for s, _ in done if reference.get(s.prompt) == s.text),
        "max_streaming_at_once": max(_max_overlap(lv.samples) for lv in passes),
    }


def _done(sample: Sample) -> bool:
    return sample.error is None and sample.finish is not None


def _pct(values: list[float], q: float) -> float | None:
    return percentile(values, q) if values else None


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


def versus_peer(paths: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Per level: headrace's aggregate tokens/s over the best llama-server row's (best -np).

    Both headrace as the worker runs by default (its default slots, else 1 slot) and the
    best headrace row are compared; and the best row of the engine called in-process, when
    it ran (what is left between it and the edge rows is NATS, the worker and the edge).
    """
    peers = [p for p in paths if p["key"].startswith(PEER)]
    ours = [p for p in paths if p["key"].startswith(HEADLINE)]
    engines = [p for p in paths if p["key"].startswith(ENGINE)]
    if not peers or not ours:
        return None
    default = next((p for p in ours if p["key"] == DEFAULT_ROW), None)
    default = default or next((p for p in ours if p["key"] == HEADLINE), ours[0])
    rows = []
    for concurrency in (lv["concurrency"] for lv in default["levels"]):
        peer = _best(peers, concurrency)
        best = _best(ours, concurrency)
        if peer is None or best is None:
            continue
        theirs, mine, top = (_level(p, concurrency) for p in (peer, default, best))
        if theirs is None or top is None:
            continue
        engine = _best(engines, concurrency)
        alone = _level(engine, concurrency) if engine else None
        rows.append({
            "concurrency": concurrency,
            "peer": peer["label"], "peer_tps": theirs["aggregate_tps"],
            "peer_ttft_p50_ms": theirs["ttft_p50_ms"],
            "headrace": default["label"],
            "headrace_tps": mine["aggregate_tps"] if mine else None,
            "ratio": _ratio(mine["aggregate_tps"] if mine else None, theirs["aggregate_tps"]),
            "ttft_p50_diff_ms": _diff(mine["ttft_p50_ms"] if mine else None,
                                      theirs["ttft_p50_ms"]),
            "best": best["label"], "best_tps": top["aggregate_tps"],
            "best_ratio": _ratio(top["aggregate_tps"], theirs["aggregate_tps"]),
            "engine": engine["label"] if engine else None,
            "engine_tps": alone["aggregate_tps"] if alone else None,
            "engine_ratio": _ratio(alone["aggregate_tps"] if alone else None,
                                   theirs["aggregate_tps"]),
            "goal": PEER_GOAL.get(concurrency, 1.0),
        })  # fmt: skip
    return rows


def like_for_like(paths: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """Per slot count both ran and per level: headrace with N slots / llama-server -np N,
    pass by pass.

    Pass i of both rows ran in the same pass, minutes apart at most, so the machine's
    drift between passes (often larger than the difference sought) falls on both alike;
    the median of the per-pass ratios is the paired estimate, their range its spread.
    """
    by_key = {p["key"]: p for p in paths}
    rows = []
    for key, peer in by_key.items():
        if not key.startswith(f"{PEER}-np"):
            continue
        slots = int(key.removeprefix(f"{PEER}-np"))
        ours = by_key.get(HEADLINE if slots == 1 else f"{HEADLINE}-{slots}-slots")
        if ours is None:
            continue
        for lv in ours["levels"]:
            theirs = _level(peer, lv["concurrency"])
            if theirs is None:
                continue
            mine, peers = lv["summary"]["aggregate_tps_passes"], theirs["aggregate_tps_passes"]
            pairs = zip(mine, peers, strict=True)  # the same passes
            ratios = [a / b for a, b in pairs if b]
            if ratios:
                rows.append({
                    "slots": slots, "concurrency": lv["concurrency"],
                    "headrace": ours["label"], "peer": peer["label"],
                    "ratios": ratios, "median": statistics.median(ratios),
                    "goal": PEER_GOAL.get(lv["concurrency"], 1.0),
                })  # fmt: skip
    return sorted(rows, key=lambda r: (r["slots"], r["concurrency"])) or None


def _best(paths: list[dict[str, Any]], concurrency: int) -> dict[str, Any] | None:
    """The path with the highest aggregate tokens/s at ``concurrency``."""
    scored = [(lv["aggregate_tps"], p) for p in paths if (lv := _level(p, concurrency))]
    return max(scored, key=lambda sp: sp[0])[1] if scored else None


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
    """The markdown tables, the headlines and how each path behaved with concurrent requests."""
    lines = [
        "| path | clients | done / cut short / errors | tok/s aggregate (passes) "
        "| tok/s per stream (p50) | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) "
        "| same text as reference | streams at once |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for path in result["paths"]:
        for lv in path["levels"]:
            s = lv["summary"]
            lines.append(
                f"| {path['label']} | {lv['concurrency']} "
                f"| {s['completed']} / {s['cut_short']} / {s['errors']} "
                f"| {_num(s['aggregate_tps'])}{_span(s['aggregate_tps_passes'])} "
                f"| {_num(s['stream_tps_p50'])} "
                f"| {_num(s['ttft_p50_ms'])} / {_num(s['ttft_p99_ms'])} "
                f"| {_num(s['itl_p50_ms'])} / {_num(s['itl_p99_ms'])} "
                f"| {s['same_text']}/{s['completed']} | {s['max_streaming_at_once']} |"
            )
    lines += _headline_lines(result.get("headline"))
    lines += _peer_lines(result.get("versus_peer"))
    lines += _paired_lines(result.get("like_for_like"))
    lines += [
        "",
        "TTFT, ITL and tokens/s per stream count the streams that received text; a stream cut "
        "short before its first token has none of them. ITL: a stream's time from its first "
        "to its last token over its tokens after the first. Tokens/s aggregate: all tokens "
        "received at that level / its wall time, over every pass (each pass's own figure in "
        "brackets). p99 of a few dozen requests is close to their maximum. Same text as "
        f"reference: the texts of {result.get('reference', 'the first path')} at its first "
        "level, prompt by prompt.",
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


def _headline_lines(head: dict[str, Any] | None) -> list[str]:
    if not head:
        return []
    return [
        "",
        f"**Headline (concurrency 1)**: headrace through the edge / in-process = "
        f"**{head['aggregate_tps_ratio']:.3f}** aggregate tokens/s "
        f"({_num(head['stream_tps_ratio'], 3)} per stream; goal >= {head['goal']}); "
        f"TTFT p50 {_signed(head['ttft_p50_diff_ms'])} ms, "
        f"p95 {_signed(head['ttft_p95_diff_ms'])} ms.",
    ]


def _peer_lines(rows: list[dict[str, Any]] | None) -> list[str]:
    if not rows:
        return []
    lines = [
        "",
        "**headrace / llama.cpp's llama-server** (aggregate output tokens/s, the best "
        "llama-server row at each level):",
        "",
        f"| clients | best llama-server | its tok/s | {rows[0]['headrace']}: tok/s | ratio "
        "| TTFT p50 vs llama-server (ms) | best headrace row | ratio "
        "| best engine row (in-process) | ratio | goal |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['peer']} | {_num(r['peer_tps'])} "
            f"| {_num(r['headrace_tps'])} | **{_num(r['ratio'], 2)}** "
            f"| {_signed(r['ttft_p50_diff_ms'])} | {r['best']} | {_num(r['best_ratio'], 2)} "
            f"| {r['engine'] or '-'} | {_num(r['engine_ratio'], 2)} | >= {r['goal']} |"
        )
    return lines


def _paired_lines(rows: list[dict[str, Any]] | None) -> list[str]:
    if not rows:
        return []
    lines = [
        "",
        "**Like for like, pass by pass** (headrace with N slots / llama-server -np N, "
        "aggregate tokens/s; the two rows of a pass ran in the same pass):",
        "",
        "| N | clients | ratio, median of the passes | each pass | passes at or above the goal "
        "| goal |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        each = ", ".join(f"{v:.2f}" for v in r["ratios"])
        above = sum(v >= r["goal"] for v in r["ratios"])
        lines.append(
            f"| {r['slots']} | {r['concurrency']} | **{r['median']:.2f}** | {each} "
            f"| {above} of {len(r['ratios'])} | >= {r['goal']} |"
        )
    return lines


def _span(values: list[float]) -> str:
    """Each pass's figure, in brackets, when there was more than one pass."""
    return f" ({', '.join(f'{v:.1f}' for v in values)})" if len(values) > 1 else ""


def _behaviour_level(path: dict[str, Any]) -> dict[str, Any]:
    levels = [lv for lv in path["levels"] if lv["concurrency"] > 1] or path["levels"]
    picked: dict[str, Any] = next((lv for lv in levels if lv["concurrency"] == 4), levels[-1])
    return picked


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1f}"


def plot(result: dict[str, Any], path: Path) -> bool:
    """TTFT p50 and tokens/s by concurrency, one line per path, and headrace / llama-server.

    False without matplotlib.
    """
    plt = pyplot()
    if plt is None:
        return False
    rows = result.get("versus_peer")
    fig, axes = plt.subplots(1, 3 if rows else 2, figsize=(18 if rows else 12, 4.8))
    left, right = axes[0], axes[1]
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
    titles = [(left, "time to first token, p50 (ms)"),
              (right, "output tokens/s: aggregate (solid), per stream p50 (dashed)")]  # fmt: skip
    if rows:
        ratio = axes[2]
        xs = [r["concurrency"] for r in rows]
        ratio.plot(xs, [r["ratio"] for r in rows], marker="o", label=rows[0]["headrace"])
        ratio.plot(xs, [r["best_ratio"] for r in rows], marker="s", linestyle="--",
                   label="best headrace row")  # fmt: skip
        if any(r["engine_ratio"] for r in rows):
            alone = [r["engine_ratio"] or float("nan") for r in rows]
            ratio.plot(xs, alone, marker="^", linestyle="-.",
                       label="best engine row, in-process")  # fmt: skip
        paired = result.get("like_for_like") or []
        for slots in dict.fromkeys(r["slots"] for r in paired):
            mine = [r for r in paired if r["slots"] == slots]
            ratio.plot([r["concurrency"] for r in mine], [r["median"] for r in mine],
                       marker=".", linestyle=(0, (1, 3)), alpha=0.7,
                       label=f"{slots} slots / -np {slots}, median of the passes")  # fmt: skip
        ratio.plot(xs, [r["goal"] for r in rows], linestyle=":", color="grey", label="goal")
        ratio.legend(fontsize=8)
        titles.append((ratio, "aggregate tokens/s, headrace / best llama-server"))
    for ax, title in titles:
        ax.set_xscale("log", base=2)
        ax.set_xticks(result["workload"]["levels"], [str(c) for c in result["workload"]["levels"]])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.legend(fontsize=7)
    fig.suptitle(f"SmolLM2-135M-Instruct, {result['workload']['threads']} llama.cpp threads, "
                 f"max_tokens {result['workload']['max_tokens']}")  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
