"""The ``headrace`` command line. Flags override ``HEADRACE_*`` variables; both are read once."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from headrace import logs
from headrace.servers import GatewayError
from schemas.connection import NatsRefused


def _overrides(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """Flags the user gave, as settings keyword arguments (unset flags defer to the environment)."""
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


_COMMON = ("nats_url", "nats_creds", "nats_tls_ca", "nats_tls_cert", "nats_tls_key", "region",
           "regions", "log_level")  # fmt: skip
_SD = ("sd_device", "sd_threads", "image_inline_chars")
_LLM = (
    "llm_n_ctx",
    "llm_threads",
    "llm_threads_batch",
    "llm_gpu_layers",
    "llm_chat_template_file",
    "llm_flash_attn",
    "llm_stream_interval_ms",
    "llm_cache_seqs",
    "llm_cache_ram_mib",
    "llm_kv_unified",
    "llm_pooling",
)
_LIMITS = (
    "jobs_max_msgs",
    "jobs_max_bytes",
    "jobs_max_age_s",
    "ack_wait_s",
    "max_deliver",
    "max_ack_pending",
    "replicas",
)


def _add_common(p: argparse.ArgumentParser, *, regions: bool = True) -> None:
    p.add_argument("--nats-url", help="NATS URL(s), comma-separated (HEADRACE_NATS_URL)")
    p.add_argument(
        "--nats-creds",
        type=Path,
        metavar="FILE",
        help="NATS user and password from a <user>.env file `headrace auth` wrote "
        "(HEADRACE_NATS_CREDS; or HEADRACE_NATS_USER and HEADRACE_NATS_PASSWORD)",
    )
    p.add_argument(
        "--nats-tls-ca",
        type=Path,
        metavar="PEM",
        help="CA that verifies NATS (HEADRACE_NATS_TLS_CA)",
    )
    p.add_argument("--nats-tls-cert", type=Path, metavar="PEM", help="client certificate (mTLS)")
    p.add_argument("--nats-tls-key", type=Path, metavar="PEM", help="the client certificate's key")
    p.add_argument("--region", help="region name (HEADRACE_REGION)")
    if regions:
        p.add_argument(
            "--regions",
            metavar="A,B,...",
            help="the regions of a NATS super-cluster, the first holding the shared buckets "
            "(HEADRACE_REGIONS; default: one region)",
        )
    p.add_argument("--log-level", help="DEBUG, INFO, WARNING ... (HEADRACE_LOG_LEVEL)")


def _add_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs-max-msgs", type=int, help="JOBS stream: most queued jobs")
    p.add_argument("--jobs-max-bytes", type=int, help="JOBS stream: most queued bytes")
    p.add_argument("--jobs-max-age-s", type=float, help="JOBS stream: oldest queued job")
    p.add_argument(
        "--ack-wait-s", type=float, help="consumers: redeliver after this long without ack"
    )
    p.add_argument("--max-deliver", type=int, help="consumers: attempts before dead-lettering")
    p.add_argument("--max-ack-pending", type=int, help="consumers: jobs in flight across the fleet")
    p.add_argument(
        "--replicas",
        type=int,
        metavar="N",
        help="copies of every stream and bucket (HEADRACE_REPLICAS; 3 on a 3-node cluster)",
    )


def cmd_up(args: argparse.Namespace) -> int:
    """Start the local stack."""
    from headrace.settings import StackSettings
    from headrace.stack import up

    names = (
        *_COMMON,
        *_LIMITS,
        "data_dir",
        "port",
        "nats_port",
        "nats_nodes",
        "nats_regions",
        "valkey_port",
        "echo_workers",
        "llm_workers",
        "sd_workers",
    )
    return up(StackSettings(**_overrides(args, names)))


def cmd_provision(args: argparse.Namespace) -> int:
    """Create or update the topology."""
    from headrace import provision
    from headrace.settings import ProvisionSettings

    settings = ProvisionSettings(**_overrides(args, (*_COMMON, *_LIMITS)))
    logs.setup(settings.log_level, "provision")
    changes = asyncio.run(provision.run(settings, provision.parse_models(args.model)))
    for what, change in changes.items():
        print(f"{what:40} {change}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a worker process."""
    from headrace import worker
    from workers.engines.base import Engine
    from workers.settings import TEXT_SLOTS, WorkerSettings

    names = (
        *_COMMON,
        "slots",
        "worker_id",
        "metrics_port",
        "echo_token_delay_s",
        "echo_tokens",
        *_LLM,
        *_SD,
    )
    overrides = _overrides(args, names)
    if args.engine in ("llm", "sd") and args.model:
        overrides[f"{args.engine}_models"] = ",".join(args.model)
    if args.engine == "llm" and args.embedding_model:
        overrides["llm_embedding_models"] = ",".join(args.embedding_model)
    settings = WorkerSettings(**overrides)
    logs.setup(settings.log_level, f"worker {args.engine}")
    if args.engine == "llm":
        if settings.slots is None:  # the runtime fetches for as many as the batch runs
            settings = settings.model_copy(update={"slots": TEXT_SLOTS})
        engine: Engine[Any] = worker.llama_engine(settings)
    elif args.engine == "sd":
        engine = worker.diffusion_engine(settings)
    else:
        engine = worker.echo_engine(settings, args.model[-1] if args.model else "echo")
    worker.run(settings, engine)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """Build a demo model."""
    from headrace.tiny_sd import build_tiny_sd

    logs.setup("INFO", "models")
    print(build_tiny_sd(args.directory))
    return 0


def cmd_edge(args: argparse.Namespace) -> int:
    """Run the HTTP edge."""
    from edge.app import run
    from edge.settings import EdgeSettings

    settings = EdgeSettings(**_overrides(args, (*_COMMON, "host", "port")))
    logs.setup(settings.log_level, "edge")
    run(settings)
    return 0


def cmd_keys_add(args: argparse.Namespace) -> int:
    """Create an API key: print it once, write only its hash."""
    from edge.settings import EdgeSettings
    from headrace import keys

    path = args.file or EdgeSettings().keys_file or Path("keys.toml")
    limits = {
        "rpm": args.rpm,
        "tpm": args.tpm,
        "max_parallel": args.max_parallel,
        "image_budget": args.image_budget,
    }
    secret, entry = keys.add(path, args.name, limits=limits, models=args.model)
    print(secret)
    print(
        f"added key {entry.name!r} ({entry.id}) to {path}; the key is shown only this once",
        file=sys.stderr,
    )
    return 0


def cmd_auth(args: argparse.Namespace) -> int:
    """Make or update a credentials directory: users, passwords, nats-server's users block."""
    from headrace.credentials import (
        SERVER_CONF,
        USERS_FILE,
        Credentials,
        write_gateways,
        write_leaf_remote,
    )
    from schemas.permissions import WORKER
    from schemas.subjects import parse_regions

    clients = {}
    for spec in args.client:
        name, _, models = spec.partition("=")
        clients[name.strip()] = [m.strip() for m in (models or "*").split(",") if m.strip()]
    regions = parse_regions(args.regions or "")
    creds = Credentials.ensure(args.directory, clients, rotate=args.rotate, regions=regions)
    if args.gateway:
        peers = dict(spec.partition("=")[::2] for spec in args.gateway)
        unknown = set(peers) - set(regions)
        if unknown or not all(peers.values()):
            raise ValueError(
                "--gateway takes REGION=HOST:PORT for regions named by --regions "
                f"(unknown: {', '.join(sorted(unknown)) or 'none'})"
            )
        print(f"gateways of {', '.join(peers)}: {write_gateways(creds.directory, peers)}")
    if args.leaf_hub:
        path = write_leaf_remote(
            creds.directory, args.leaf_hub, WORKER, creds.password(WORKER).get_secret_value()
        )
        print(f"leaf site dialling {args.leaf_hub} as {WORKER}: {path}")
    for user in creds.users.values():
        what = "role" if user.models is None else "native client: " + ",".join(user.models)
        rotated = " (new password)" if user.name in args.rotate else ""
        print(f"{user.name:16} {what}{rotated}   {creds.directory / f'{user.name}.env'}")
    print(
        f"server: include {creds.directory / SERVER_CONF}; passwords: {creds.directory / USERS_FILE}"
        " (0600); reload nats-server (SIGHUP) after a change",
        file=sys.stderr,
    )
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Print workers, queues and dead letters."""
    from headrace import status
    from headrace.settings import ProvisionSettings

    settings = ProvisionSettings(**_overrides(args, _COMMON))
    edges = [u.strip() for u in (args.edges or "").split(",") if u.strip()]
    return asyncio.run(status.run(settings, watch_s=args.watch, edges=edges))


def cmd_bench(args: argparse.Namespace) -> int:
    """Run benchmarks: the echo pipeline and edge, LLM serving side by side, image generation.

    ``all`` runs every one of them, one after another, in this one invocation.
    """
    from headrace.bench import edge, pipeline

    everything = ("pipeline", "edge", "llm", "sd", "restarts", "failover", "regions")
    what = {"echo": ("pipeline", "edge"), "all": everything}.get(args.what, (args.what,))
    if args.quick:  # smaller echo runs too
        args.jobs, args.samples, args.requests = (min(args.jobs, 500), min(args.samples, 100),
                                                  min(args.requests, 500))  # fmt: skip
    status = 0
    if "pipeline" in what:
        status |= pipeline.pipeline(jobs=args.jobs, latency_samples=args.samples, out=args.out)
    if "edge" in what:
        status |= edge.run(samples=args.samples, requests=args.requests, out=args.out)
    if "llm" in what or "llm-turns" in what:
        from headrace.bench import llm

        status |= llm.run(args.out, _llm_options(args, turns_only="llm" not in what))
    if "sd" in what:
        from headrace.bench import sd

        status |= sd.run(quick=args.quick, out=args.out, threads=args.threads)
    if "regions" in what:
        from headrace.bench import regions

        samples = min(args.samples, 10) if args.quick else min(args.samples, 40)
        status |= regions.run(samples=samples, out=args.out)
    if "restarts" in what:
        from headrace.bench import restarts

        count = min(args.restarts, 2) if args.quick else args.restarts
        status |= restarts.run(restarts=count, in_flight=args.in_flight, out=args.out)
    if "failover" in what:
        from headrace.bench import failover

        kills = min(args.kills, 3) if args.quick else args.kills
        job_s = min(args.sigterm_job_s, 5.0) if args.quick else args.sigterm_job_s
        status |= failover.run(kills, args.out, engine=args.engine, sigterm_job_s=job_s or None)
    return status


def _ints(text: str) -> tuple[int, ...]:
    """``1,4,16`` -> (1, 4, 16), every one at least 1."""
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas: {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected numbers of at least 1: {text!r}")
    return values


def _llm_options(args: argparse.Namespace, turns_only: bool) -> Any:
    import shlex

    from headrace.bench.llm import Options

    return Options(
        quick=args.quick, threads=args.threads, passes=args.passes, levels=args.levels,
        max_tokens=args.max_tokens, peer=args.peer, peer_np=args.peer_np,
        peer_args=tuple(shlex.split(args.peer_args)), slots=args.llm_slots,
        only=tuple(args.only.split(",")) if args.only else None,
        turns=not args.no_turns, throughput=not turns_only,
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every subcommand."""
    parser = argparse.ArgumentParser(prog="headrace", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("up", help="run nats-server, valkey and workers locally (Ctrl-C stops all)")
    _add_common(p, regions=False)
    _add_limits(p)
    p.add_argument(
        "--data-dir", type=Path, help="where nats and valkey keep files (default .headrace)"
    )
    p.add_argument("--port", type=int, help="the edge's HTTP port (HEADRACE_PORT, default 8000)")
    p.add_argument("--nats-port", type=int, help="default 4222 (a cluster's nodes count up)")
    p.add_argument(
        "--cluster",
        dest="nats_nodes",
        type=int,
        metavar="N",
        help="run N nats-server nodes as one JetStream cluster, streams at R3 (HEADRACE_NATS_NODES)",
    )
    p.add_argument(
        "--regions",
        dest="nats_regions",
        type=int,
        metavar="N",
        help="run N regions (each a cluster of --cluster nodes) joined by gateways into one "
        "super-cluster, workers and an edge in each (names: HEADRACE_REGIONS, else r1..rN)",
    )
    p.add_argument("--valkey-port", type=int, help="default 6379")
    p.add_argument("--echo-workers", type=int, help="echo workers to start (default 1)")
    p.add_argument(
        "--sd-workers", type=int, help="tiny-sd workers on diffusers to start (default 1)"
    )
    p.add_argument(
        "--llm-workers", type=int, help="SmolLM2 workers on llama.cpp to start (default 1)"
    )
    p.set_defaults(func=cmd_up)

    p = sub.add_parser("provision", help="create or update streams, buckets and consumers")
    _add_common(p)
    _add_limits(p)
    p.add_argument(
        "--model",
        action="append",
        default=[],
        metavar="KIND=MODEL",
        help="also create this model's consumer, e.g. llm=SmolLM2 (repeatable)",
    )
    p.set_defaults(func=cmd_provision)

    p = sub.add_parser("worker", help="run a worker")
    p.add_argument(
        "engine",
        choices=["echo", "llm", "sd"],
        help="echo: deterministic pseudo-tokens, no model; llm: GGUF models on llama.cpp; "
        "sd: diffusers pipelines (Stable Diffusion and friends)",
    )
    _add_common(p)
    p.add_argument(
        "--model",
        action="append",
        metavar="ID[=PATH]",
        help="echo: the model id (default 'echo'); llm: ID=PATH.gguf, repeatable "
        "(HEADRACE_LLM_MODELS, default: the bundled SmolLM2-135M-Instruct); sd: ID=DIR or "
        "ID=hub-id, repeatable (HEADRACE_SD_MODELS, default: the demo tiny-sd, random weights)",
    )
    p.add_argument(
        "--embedding-model",
        action="append",
        metavar="ID=PATH",
        help="llm: a dedicated embedding GGUF, served for embeddings only, repeatable "
        "(HEADRACE_LLM_EMBEDDING_MODELS)",
    )
    p.add_argument(
        "--pooling",
        dest="llm_pooling",
        choices=["mean", "cls", "last"],
        help="llm: pooling of embeddings (default: the GGUF's own, else mean)",
    )
    p.add_argument(
        "--slots", type=int, help="jobs run at once (default: llm 4, a batch's sequences; else 1)"
    )
    p.add_argument("--worker-id", help="registry id (default host-pid-random)")
    p.add_argument(
        "--metrics-port",
        type=int,
        metavar="N",
        help="serve Prometheus /metrics on this port (HEADRACE_METRICS_PORT; default: none)",
    )
    p.add_argument("--echo-token-delay-s", type=float, help="echo: delay per token")
    p.add_argument("--echo-tokens", type=int, help="echo: tokens when max_tokens is unset")
    p.add_argument(
        "--n-ctx", dest="llm_n_ctx", type=int, metavar="N", help="llm: context size (default 2048)"
    )
    p.add_argument(
        "--threads",
        dest="llm_threads",
        type=int,
        metavar="N",
        help="llm: CPU threads of a model's context, all slots together (CPUs)",
    )
    p.add_argument(
        "--threads-batch",
        dest="llm_threads_batch",
        type=int,
        metavar="N",
        help="llm: CPU threads for steps of more than one token (as --threads)",
    )
    p.add_argument(
        "--gpu-layers",
        dest="llm_gpu_layers",
        type=int,
        metavar="N",
        help="llm: layers on the GPU (-1: all)",
    )
    p.add_argument(
        "--flash-attn",
        dest="llm_flash_attn",
        choices=["auto", "on", "off"],
        help="llm: flash attention (default auto: where llama.cpp has it)",
    )
    p.add_argument(
        "--stream-interval-ms",
        dest="llm_stream_interval_ms",
        type=float,
        metavar="MS",
        help="llm: a job's text goes out at most once per interval x the jobs running, as one "
        "delta (default 40; 0: every token at once)",
    )
    p.add_argument(
        "--cache-seqs",
        dest="llm_cache_seqs",
        type=int,
        metavar="N",
        help="llm: finished sequences kept in cells for prompt-prefix reuse (default: slots; "
        "0: off; with a stream per slot, each free slot's stream keeps its last one)",
    )
    p.add_argument(
        "--cache-ram-mib",
        dest="llm_cache_ram_mib",
        type=int,
        metavar="MIB",
        help="llm: host memory for cached sequences the KV cache lets go, copied back for a "
        "prompt sharing their prefix (default 2048; 0: off)",
    )
    p.add_argument(
        "--kv-unified",
        dest="llm_kv_unified",
        action="store_const",
        const=True,
        help="llm: one KV cache for every slot (running sequences share prefix cells, more "
        "finished ones than slots stay cached in cells) instead of a stream per slot",
    )
    p.add_argument(
        "--chat-template",
        dest="llm_chat_template_file",
        type=Path,
        metavar="FILE",
        help="llm: Jinja chat template replacing the GGUF's own",
    )
    p.add_argument(
        "--device", dest="sd_device", choices=["auto", "cuda", "cpu"], help="sd: where to run"
    )
    p.add_argument(
        "--torch-threads", dest="sd_threads", type=int, metavar="N", help="sd: CPU threads"
    )
    p.add_argument(
        "--image-inline-chars",
        type=int,
        metavar="N",
        help="sd: results above this many base64 characters go to the images object store",
    )
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("models", help="build demo models")
    p.add_argument("what", choices=["tiny-sd"], help="tiny-sd: a random-weight Stable Diffusion")
    p.add_argument("directory", type=Path, help="where to save it")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("edge", help="run the HTTP edge (OpenAI-compatible API)")
    _add_common(p)
    p.add_argument("--host", help="address to listen on (HEADRACE_HOST, default 127.0.0.1)")
    p.add_argument("--port", type=int, help="port (HEADRACE_PORT, default 8000)")
    p.set_defaults(func=cmd_edge)

    p = sub.add_parser("keys", help="manage API keys in a keys file")
    keys = p.add_subparsers(dest="keys_command", required=True)
    p = keys.add_parser("add", help="create a key: printed once, only its hash is written")
    p.add_argument("name", help="a name for the key (shown in logs and metrics, never secret)")
    p.add_argument(
        "--file", type=Path, help="keys file (HEADRACE_KEYS_FILE, default keys.toml); created 0600"
    )
    p.add_argument("--rpm", type=int, help="requests per minute (default: unlimited)")
    p.add_argument("--tpm", type=int, help="tokens per minute (default: unlimited)")
    p.add_argument("--max-parallel", type=int, help="requests at once (default: unlimited)")
    p.add_argument(
        "--image-budget", type=int, help="megapixel-steps per minute (default: unlimited)"
    )
    p.add_argument(
        "--model",
        action="append",
        metavar="ID",
        help="a model the key may use (repeatable; default: all)",
    )
    p.set_defaults(func=cmd_keys_add)

    p = sub.add_parser(
        "auth", help="NATS users per role and native client: make once, keep, rotate (0600 files)"
    )
    p.add_argument(
        "directory", type=Path, help="the credentials directory (headrace up: .headrace/auth)"
    )
    p.add_argument(
        "--client",
        action="append",
        default=[],
        metavar="NAME[=MODEL,...]",
        help="a NATS-native client allowed these models (default: every model); repeatable",
    )
    p.add_argument(
        "--rotate", action="append", default=[], metavar="USER", help="give USER a new password"
    )
    p.add_argument(
        "--regions",
        metavar="A,B,...",
        help="a super-cluster's regions: every role's permissions cover every region's streams",
    )
    p.add_argument(
        "--gateway",
        action="append",
        default=[],
        metavar="REGION=HOST:PORT",
        help="write gateways.conf: each region's gateway address and the shared gateway "
        "password (repeatable; compose.region.yaml)",
    )
    p.add_argument(
        "--leaf-hub",
        metavar="HOST:PORT",
        help="write leaf-remote.conf: a leaf site dialling this leafnode port as the worker "
        "user (compose.leaf.yaml)",
    )
    p.set_defaults(func=cmd_auth)

    p = sub.add_parser("status", help="workers, queue depth and dead letters")
    _add_common(p)
    p.add_argument("--watch", type=float, metavar="S", help="refresh every S seconds")
    p.add_argument(
        "--edges",
        metavar="URL,...",
        help="regions: edges whose /metrics give the spill counts between regions",
    )
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "bench",
        help="benchmarks: pipeline and edge (echo engine; echo = both), llm (SmolLM2 "
        "in-process vs llama_cpp.server vs headrace), sd (tiny-sd in-process vs headrace, and "
        "the object store), restarts (nats-server restarted under load), failover (workers "
        "SIGKILLed mid-stream, one SIGTERMed with a long job), regions (own region vs spilled, "
        "on loopback and over a 40 ms proxy); all (the default) runs every one",
    )
    p.add_argument(
        "what",
        nargs="?",
        choices=[
            "all",
            "echo",
            "pipeline",
            "edge",
            "llm",
            "llm-turns",
            "sd",
            "restarts",
            "failover",
            "regions",
        ],
        default="all",
    )
    p.add_argument("--jobs", type=int, default=2000, help="jobs for the throughput run")
    p.add_argument("--samples", type=int, default=500, help="1-token jobs for the latency runs")
    p.add_argument(
        "--requests", type=int, default=3000, help="requests for the edge throughput run"
    )
    p.add_argument("--restarts", type=int, default=20, help="restarts: broker restarts")
    p.add_argument(
        "--in-flight", type=int, default=20, help="restarts: requests in flight at each restart"
    )
    p.add_argument("--kills", type=int, default=100, help="failover: workers SIGKILLed")
    p.add_argument(
        "--engine",
        choices=["echo", "llama"],
        default="echo",
        help="failover: echo workers, or SmolLM2 on llama.cpp (temperature 0 and 0.8)",
    )
    p.add_argument(
        "--sigterm-job-s",
        type=float,
        default=30.0,
        help="failover: length of the job whose worker is SIGTERMed (0: skip; echo only)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small runs: echo at most 500 jobs; llm 2 prompts, 16 tokens, 1 and 4 clients; "
        "sd 4 and 10 steps, 2 repeats; restarts 2; failover 3 kills, a 5 s SIGTERM job",
    )
    p.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help="llm: llama.cpp threads in every path; sd: torch threads in both paths (CPUs)",
    )
    llm = p.add_argument_group("llm and llm-turns")
    llm.add_argument("--passes", type=int, metavar="N",
                     help="every system once per pass, in turn (2; --quick 1)")  # fmt: skip
    llm.add_argument("--levels", type=_ints, metavar="1,4,16", help="concurrent clients")
    llm.add_argument("--max-tokens", type=int, metavar="N", help="tokens per request (64)")
    llm.add_argument(
        "--peer", metavar="PATH",
        help="llama.cpp's llama-server binary (default: the one `make llama-server` built in "
        ".cache/llama-server/bin, or $HEADRACE_LLAMA_SERVER; without one the peer rows are "
        "left out)",
    )  # fmt: skip
    llm.add_argument("--peer-np", type=_ints, default=(1, 4, 8), metavar="1,4,8",
                     help="llama-server -np (slots) of each peer row")  # fmt: skip
    llm.add_argument("--peer-args", default="", metavar="ARGS",
                     help="more llama-server arguments, e.g. '-fa off'")  # fmt: skip
    llm.add_argument("--llm-slots", type=_ints, metavar="1,2",
                     help="headrace rows: worker slots of each (default: 1,2 for an engine "
                     "with a context per slot; 1 and the most clients of --levels for a "
                     "batching engine)")  # fmt: skip
    llm.add_argument("--only", metavar="KEYS",
                     help="run only the paths whose key starts with one of these (comma "
                     "separated: in-process, engine, llama_cpp.server, headrace, llama-server)")  # fmt: skip
    llm.add_argument("--no-turns", action="store_true",
                     help="llm: leave out the multi-turn conversation benchmark")  # fmt: skip
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="where JSON and PNG go")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``headrace`` command."""
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except NatsRefused:
        return 2  # connect() logged which server refused which user
    except ValidationError as e:
        for err in e.errors(include_url=False, include_input=False):
            where = ".".join(str(p) for p in err["loc"])
            print(f"headrace: invalid setting {where}: {err['msg']}", file=sys.stderr)
        return 2
    except (ValueError, OSError, GatewayError) as e:
        print(f"headrace: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
