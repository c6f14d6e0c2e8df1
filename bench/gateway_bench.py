"""Benchmark of the gateway: what `Gateway.stream()` adds to a model call, against the official client alone.

    python bench/gateway_bench.py [--quick] [--profile] [--backend auto|ollama] [--rate-limit SPEC]

Every figure is printed next to a baseline measured in the same process, against the same simulated Ollama
server, interleaved with it: the official `ollama` client calling the simulator directly, with the very request
body the gateway's Ollama backend sends (same messages, options, keep_alive; same client settings). The gateway
is built by `Runtime` from settings, as the web app and the CLI build it, with the audit store on a migrated
SQLite file in a temporary directory; requests are `ChatRequest`s built here (no user or agent records needed).

The simulators (`tests/ollama_sim.py`) run in processes of their own, started and stopped here, so that their
serving threads do not compete with the measured client for this process's GIL (and so that this process's
CPU time is the client's alone):

- time to first token: a simulator with a 50 ms time to first token and 20-token answers; rounds of three
  requests, one at a time (direct, gateway, direct again, in an order that rotates each round): the table
  shows the distribution of (gateway - direct) per round, and, as the noise floor of the machine, of
  (second direct - first direct); also the gateway's own time before it calls the backend (`stream()` to its
  `Started` event: audit record, rate limit, admission), in wall and in CPU time of the calling thread;
- streaming throughput: 2,000-token answers paced at 1,000 tokens/s, with 1 caller and with `max_concurrent`
  callers at once (threads); tokens per second from each stream's first token to its last, summed over the
  callers;
- cost per chunk: an unpaced simulator (as fast as it can send); CPU time of this process (and wall time) per
  chunk, from the difference between long and short answers (20,000 and 2,000 tokens, capped with
  num_predict), so the fixed cost of a request (the audit writes, connection handling) drops out; that fixed
  cost is shown on its own row;
- refusal when full: `max_concurrent` requests generating (at 50 tokens/s, read by threads) and `queue_size`
  requests waiting, then requests one after the other, each refused busy and recorded as `busy` in the audit
  store (checked afterwards). Baseline: `Admission.enter()` refusing alone, without the audit.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import os
import pstats
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import ollama
from report import log, markdown_table, percentile, verdict
from sqlalchemy import func, select

from clawdbot.backends import ContentDelta
from clawdbot.errors import BusyError
from clawdbot.gateway import ChatRequest, Finished, Gateway, Queued, Started
from clawdbot.models import Request, Status
from clawdbot.runtime import Runtime
from clawdbot.settings import Settings

REPO = Path(__file__).resolve().parents[1]
MODEL = "qwen3:32b"
MAX_CONCURRENT = 4
QUEUE_SIZE = 3
LARGE_RATE_LIMIT = "1000000/minute;100000/10seconds"

ADDED_TTFT_P50_GOAL_MS = 2.0
ADDED_TTFT_P95_GOAL_MS = 5.0
THROUGHPUT_RATIO_GOAL = 0.98
REFUSAL_GOAL_MS = 50.0

TTFT_S = 0.05
PACED_TOKENS_PER_S = 1000.0
PACED_TOKENS = 2000
UNPACED_TOKENS = 20_000
SLOW_TOKENS_PER_S = 50.0

_ZH = "审计日志记录每一次请求的提示、上下文和回复，以便事后核查。模型可能会调用工具并引用附件中的内容。"
_EN = (
    "The audit log keeps every prompt, context and response so that auditors can check them later; "
    "the model may call tools and quote the attachments. "
)
PROMPT = "Summarize what the audit log recorded last week in three sentences."


def _history(chars: int) -> list[dict[str, Any]]:
    """A system message and a few earlier turns, about `chars` characters of mixed Chinese and English."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "You are a careful assistant. " + _ZH}]
    n = 0
    while sum(len(m["content"]) for m in messages) < chars:
        role = "user" if n % 2 == 0 else "assistant"
        messages.append({"role": role, "content": (_EN + _ZH) * (1 + n % 2)})
        n += 1
    if messages[-1]["role"] == "user":
        messages.append({"role": "assistant", "content": _EN})
    return [*messages, {"role": "user", "content": PROMPT}]


MESSAGES = _history(4000)


# --- simulators in child processes ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SimSpec:
    name: str
    ttft: float
    tokens_per_s: float | None
    default_tokens: int


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def simulator(spec: SimSpec, attempts: int = 3) -> Iterator[str]:
    """Run `python -m tests.ollama_sim` with `spec` in a child process; yields its URL; stops it afterwards."""
    for attempt in range(attempts):
        port = _free_port()
        command = [
            sys.executable,
            "-m",
            "tests.ollama_sim",
            "--port",
            str(port),
            "--ttft",
            str(spec.ttft),
            "--default-tokens",
            str(spec.default_tokens),
        ]
        if spec.tokens_per_s:
            command += ["--tokens-per-s", str(spec.tokens_per_s)]
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            line = proc.stdout.readline() if sel.select(15) else ""
        if "listening on" in line:
            break
        _stop(proc)
        if attempt == attempts - 1:
            raise RuntimeError(f"the {spec.name} simulator did not start (exit code {proc.returncode})")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


# --- the two paths -------------------------------------------------------------------------------------------


def open_gateway(url: str, db_url: str, workdir: Path, args: argparse.Namespace) -> Runtime:
    settings = Settings(
        database_url=db_url,
        data_dir=workdir,
        ollama_host=url,
        backend=args.backend,
        default_model=MODEL,
        fallback_model="",
        max_concurrent=MAX_CONCURRENT,
        queue_size=QUEUE_SIZE,
        queue_timeout=600.0,
        rate_limit=args.rate_limit,
        redis_url="",
        retries=2,
        keep_alive="5m",
    )
    return Runtime.open(settings, upgrade=True)


def direct_client(settings: Settings) -> ollama.Client:
    """An `ollama.Client` set up like the gateway's Ollama backend sets up its own."""
    timeout = httpx.Timeout(
        connect=settings.connect_timeout,
        read=settings.read_timeout,
        write=settings.connect_timeout,
        pool=settings.connect_timeout,
    )
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
    return ollama.Client(host=settings.ollama_host, timeout=timeout, limits=limits)


def make_request(max_output_tokens: int, user: str = "bench") -> ChatRequest:
    return ChatRequest(
        user=user,
        messages=MESSAGES,
        model=MODEL,
        prompt=PROMPT,
        client_ip="127.0.0.1",
        max_output_tokens=max_output_tokens,
    )


@dataclass
class Timing:
    """One streamed answer: perf_counter at the call, first and last token, end; process CPU at call and end."""

    start: float
    first: float
    last: float
    end: float
    tokens: int
    cpu: float
    admitted: float = 0.0
    """perf_counter at the gateway's `Started` event (the backend is called next); 0 for the direct path."""
    admitted_cpu: float = 0.0
    """CPU time of the calling thread from the call to `Started`; 0 for the direct path."""

    @property
    def ttft_ms(self) -> float:
        return (self.first - self.start) * 1000

    @property
    def rate(self) -> float:
        """Tokens per second from the first token to the last."""
        return (self.tokens - 1) / (self.last - self.first) if self.last > self.first else 0.0


def run_direct(client: ollama.Client, request: ChatRequest, keep_alive: str) -> Timing:
    """The request as `OllamaBackend.stream` sends it, straight through the official client."""
    cpu0 = time.process_time()
    start = time.perf_counter()
    chunks = client.chat(
        model=request.model,
        messages=request.messages,
        tools=request.tools,
        think=request.think,
        stream=True,
        options={
            "num_ctx": request.context_budget + request.max_output_tokens,
            "num_predict": request.max_output_tokens,
        },
        keep_alive=keep_alive,
    )
    first = last = 0.0
    tokens = 0
    done = False
    for chunk in chunks:
        if chunk.message.content:
            last = time.perf_counter()
            if not tokens:
                first = last
            tokens += 1
        done = done or bool(chunk.done)
    end = time.perf_counter()
    if not done or not tokens:
        raise RuntimeError("the direct answer ended without tokens or without its final chunk")
    return Timing(start, first, last, end, tokens, time.process_time() - cpu0)


def run_gateway(gateway: Gateway, request: ChatRequest) -> Timing:
    cpu0 = time.process_time()
    thread_cpu0 = time.thread_time()
    start = time.perf_counter()
    first = last = 0.0
    tokens = 0
    admitted = admitted_cpu = 0.0
    finished: Finished | None = None
    for event in gateway.stream(request):
        if isinstance(event, ContentDelta):
            last = time.perf_counter()
            if not tokens:
                first = last
            tokens += 1
        elif isinstance(event, Started) and not admitted:
            admitted = time.perf_counter()
            admitted_cpu = time.thread_time() - thread_cpu0
        elif isinstance(event, Finished):
            finished = event
    end = time.perf_counter()
    if finished is None or finished.status is not Status.OK or not tokens:
        raise RuntimeError(f"the gateway's answer did not succeed: {finished}")
    return Timing(start, first, last, end, tokens, time.process_time() - cpu0, admitted, admitted_cpu)


# --- measurements --------------------------------------------------------------------------------------------


@dataclass
class TtftResult:
    direct: list[float]
    gateway: list[float]
    diffs: list[float]
    """Gateway minus direct, per pair of neighbouring requests."""
    noise: list[float]
    """A second direct request minus the first, per pair: the differences the machine alone produces."""
    before_backend: list[float]
    """Milliseconds from `Gateway.stream()` to its `Started` event: the audit record, limit and admission."""
    before_backend_cpu: list[float]
    """The calling thread's CPU milliseconds in that time."""
    after_started: list[float]
    """The gateway's time from `Started` to its first token, minus the direct request's time to first token."""


def measure_ttft(client: ollama.Client, gateway: Gateway, keep_alive: str, rounds: int) -> TtftResult:
    """`rounds` rounds of three requests (direct, gateway, direct again), in an order that rotates each round."""
    request = make_request(max_output_tokens=2048)
    for _ in range(5):  # warm-up: connections, statement caches, the backend probe
        run_direct(client, request, keep_alive)
        run_gateway(gateway, request)
    result = TtftResult([], [], [], [], [], [], [])
    for i in range(rounds):
        timings: dict[str, Timing] = {}
        order = ("direct", "gateway", "again")
        for path in order[i % 3 :] + order[: i % 3]:
            timings[path] = (
                run_gateway(gateway, request)
                if path == "gateway"
                else run_direct(client, request, keep_alive)
            )
        d, g, again = timings["direct"], timings["gateway"], timings["again"]
        result.direct.append(d.ttft_ms)
        result.gateway.append(g.ttft_ms)
        result.diffs.append(g.ttft_ms - d.ttft_ms)
        result.noise.append(again.ttft_ms - d.ttft_ms)
        result.before_backend.append((g.admitted - g.start) * 1000)
        result.before_backend_cpu.append(g.admitted_cpu * 1000)
        result.after_started.append((g.first - g.admitted) * 1000 - d.ttft_ms)
    return result


def concurrent_rates(callers: int, run: Callable[[], Timing]) -> float:
    """Run `callers` answers at once (threads started together); the sum of their tokens per second."""
    barrier = threading.Barrier(callers)
    timings: list[Timing] = []
    errors: list[BaseException] = []

    def work() -> None:
        barrier.wait()
        try:
            timings.append(run())
        except BaseException as exc:  # reported after the run
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(callers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return sum(t.rate for t in timings)


def measure_throughput(
    client: ollama.Client, gateway: Gateway, keep_alive: str, tokens: int, callers: int, rounds: int
) -> tuple[float, float]:
    """Median over `rounds` (direct and gateway alternating) of the summed tokens/s: (direct, gateway)."""
    request = make_request(max_output_tokens=tokens)
    run_direct(client, make_request(20), keep_alive)  # warm-up
    run_gateway(gateway, make_request(20))
    direct: list[float] = []
    through: list[float] = []
    for i in range(rounds):
        order = ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")
        for path in order:
            if path == "direct":
                direct.append(concurrent_rates(callers, lambda: run_direct(client, request, keep_alive)))
            else:
                through.append(concurrent_rates(callers, lambda: run_gateway(gateway, request)))
    return statistics.median(direct), statistics.median(through)


@dataclass
class ChunkCost:
    cpu_us: float
    wall_us: float
    fixed_cpu_ms: float


def measure_chunk_cost(
    client: ollama.Client, gateway: Gateway, keep_alive: str, long: int, rounds: int
) -> tuple[ChunkCost, ChunkCost]:
    """CPU and wall time per chunk, and CPU per request besides the chunks: (direct, gateway).

    From the medians of long answers and of short ones (a tenth as long, asked three times as often, since they
    are cheap and noisier): per chunk = (long - short) / (chunks apart); per request = short - its chunks.
    """
    short = long // 10
    requests = {n: make_request(max_output_tokens=n) for n in (long, short)}
    runs: dict[tuple[str, int], list[Timing]] = {
        (path, n): [] for path in ("direct", "gateway") for n in (long, short)
    }
    runners: dict[str, Callable[[ChatRequest], Timing]] = {
        "direct": lambda request: run_direct(client, request, keep_alive),
        "gateway": lambda request: run_gateway(gateway, request),
    }

    def once(path: str, n: int) -> None:
        timing = runners[path](requests[n])
        if timing.tokens != n:
            raise RuntimeError(f"{path}: expected {n} tokens, got {timing.tokens}")
        runs[path, n].append(timing)

    once("direct", short)  # warm-up
    once("gateway", short)
    for key in runs:
        runs[key].clear()
    for i in range(rounds):
        paths = ("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")
        for n in (long, short, short, short):
            for path in paths:
                once(path, n)

    def cost(path: str) -> ChunkCost:
        cpu_long = statistics.median(t.cpu for t in runs[path, long])
        cpu_short = statistics.median(t.cpu for t in runs[path, short])
        wall_long = statistics.median(t.end - t.start for t in runs[path, long])
        wall_short = statistics.median(t.end - t.start for t in runs[path, short])
        cpu_chunk = (cpu_long - cpu_short) / (long - short)
        return ChunkCost(
            cpu_us=cpu_chunk * 1e6,
            wall_us=(wall_long - wall_short) / (long - short) * 1e6,
            fixed_cpu_ms=(cpu_short - short * cpu_chunk) * 1000,
        )

    return cost("direct"), cost("gateway")


@dataclass
class Holder:
    """A request that holds a slot or a place in the queue, read by a thread until told to stop."""

    gateway: Gateway
    stop: threading.Event
    state: threading.Event = field(default_factory=threading.Event)
    first: object = None
    error: BaseException | None = None
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        stream = self.gateway.stream(make_request(max_output_tokens=100_000, user="bench-holder"))
        try:
            for event in stream:
                if self.first is None and isinstance(event, Queued | Started):
                    self.first = event
                    self.state.set()
                if self.stop.is_set():
                    break
        except BaseException as exc:  # reported by the main thread
            self.error = exc
        finally:
            stream.close()
            self.state.set()


@dataclass
class RefusalResult:
    gateway_ms: list[float]
    admission_ms: list[float]
    busy_recorded: int
    busy_expected: int


def measure_refusals(runtime: Runtime, count: int) -> RefusalResult:
    gateway = runtime.gateway
    stop = threading.Event()
    holders: list[Holder] = []
    try:
        for i in range(MAX_CONCURRENT + QUEUE_SIZE):
            holder = Holder(gateway, stop)
            holder.start()
            if not holder.state.wait(10):
                raise RuntimeError("a holding request did not start")
            expected = Started if i < MAX_CONCURRENT else Queued
            if not isinstance(holder.first, expected) or holder.error is not None:
                raise RuntimeError(f"holding request {i}: expected {expected.__name__}, got {holder.first}")
            holders.append(holder)
        stats = gateway.admission.snapshot()
        if (stats.generating, stats.queued) != (MAX_CONCURRENT, QUEUE_SIZE):
            raise RuntimeError(f"the gateway is not full: {stats}")
        request = make_request(max_output_tokens=2048, user="bench-refused")
        warmup = 5
        timings: list[float] = []
        for i in range(warmup + count):
            started = time.perf_counter()
            events = list(gateway.stream(request))
            elapsed = (time.perf_counter() - started) * 1000
            last = events[-1]
            if not isinstance(last, Finished) or last.status is not Status.BUSY:
                raise RuntimeError(f"expected a busy refusal, got {last}")
            if i >= warmup:
                timings.append(elapsed)
        admission: list[float] = []
        for _ in range(count):
            started = time.perf_counter()
            try:
                gateway.admission.enter().release()
            except BusyError:
                admission.append((time.perf_counter() - started) * 1000)
            else:
                raise RuntimeError("Admission.enter() admitted a request while the gateway was full")
        stats = gateway.admission.snapshot()
        if (stats.generating, stats.queued) != (MAX_CONCURRENT, QUEUE_SIZE):
            raise RuntimeError(f"the holding requests ended during the measurement: {stats}")
    finally:
        stop.set()
        for holder in holders:
            assert holder.thread is not None
            holder.thread.join(10)
    errors = [h.error for h in holders if h.error is not None]
    if errors:
        raise errors[0]
    with runtime.db.read() as session:
        recorded = session.execute(
            select(func.count())
            .select_from(Request)
            .where(Request.user == "bench-refused", Request.status == Status.BUSY.value)
        ).scalar_one()
    return RefusalResult(timings, admission, int(recorded), warmup + count)


def profile(label: str, work: Callable[[], object], limit: int = 30) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    work()
    profiler.disable()
    return listing(label, profiler, limit)


def profile_until_started(gateway: Gateway, count: int, limit: int = 30) -> str:
    """cProfile of what the gateway does before it calls the backend (the time it adds to the first token)."""
    request = make_request(2048)
    profiler = cProfile.Profile()
    for _ in range(count):
        stream = gateway.stream(request)
        profiler.enable()
        for event in stream:
            if isinstance(event, Started):
                break
        profiler.disable()
        for _event in stream:  # the rest of the answer, not profiled
            pass
        time.sleep(TTFT_S)  # as between the measured requests, which each wait for the first token
    return listing(f"{count} gateway requests from stream() to Started", profiler, limit)


def listing(label: str, profiler: cProfile.Profile, limit: int) -> str:
    out = io.StringIO()
    out.write(f"== cProfile: {label}, sorted by internal time ==\n")
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(limit)
    out.write(f"== cProfile: {label}, sorted by cumulative time ==\n")
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(limit)
    return out.getvalue()


# --- output --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    measure: str
    result: str
    baseline: str = ""
    ratio: str = ""
    added: str = ""
    goal: str = ""
    verdict: str = ""


def table(rows: list[Row]) -> str:
    header = ("Measure", "Gateway", "Direct (baseline)", "Ratio", "Added", "Goal", "")
    cells = [(r.measure, r.result, r.baseline, r.ratio, r.added, r.goal, r.verdict) for r in rows]
    return markdown_table(header, cells)


def compare(measure: str, gateway: float, direct: float, digits: int, unit: str = "") -> Row:
    """A row of gateway against direct, with their ratio and the difference."""
    return Row(
        measure,
        f"{gateway:,.{digits}f}",
        f"{direct:,.{digits}f}",
        f"{gateway / direct:.3f}" if direct > 0 else "",
        f"{gateway - direct:+,.{digits}f}{unit}",
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="a smaller run (about 20 s instead of 2 minutes)"
    )
    parser.add_argument(
        "--backend",
        choices=("auto", "ollama"),
        default="auto",
        help="the backend setting (default auto, as shipped: it probes /api/version every 10 s)",
    )
    parser.add_argument(
        "--rate-limit",
        default=LARGE_RATE_LIMIT,
        help=f"the rate limit spec (default {LARGE_RATE_LIMIT!r}, never reached; '' turns the limit off)",
    )
    parser.add_argument("--profile", action="store_true", help="print cProfile listings of the gateway paths")
    args = parser.parse_args(argv)

    quick = args.quick
    rounds_ttft = 50 if quick else 200
    paced_tokens = 1000 if quick else PACED_TOKENS
    rounds = 1 if quick else 3
    long_tokens = 5000 if quick else UNPACED_TOKENS
    cost_rounds = 2 if quick else 5
    refusals = 50 if quick else 200

    specs = {
        "ttft": SimSpec("time-to-first-token", TTFT_S, None, 20),
        "paced": SimSpec("paced", 0.0, PACED_TOKENS_PER_S, PACED_TOKENS),
        "unpaced": SimSpec("unpaced", 0.0, None, UNPACED_TOKENS),
        "slow": SimSpec("slow", TTFT_S, SLOW_TOKENS_PER_S, 10_000),
    }
    started = time.perf_counter()
    rows: list[Row] = []
    profiles: list[str] = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="clawdbot-gwbench-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        db_url = f"sqlite:///{workdir / 'audit.db'}"
        log("starting the simulators")
        urls = {key: stack.enter_context(simulator(spec)) for key, spec in specs.items()}
        runtimes: dict[str, Runtime] = {}
        clients: dict[str, ollama.Client] = {}
        for key, url in urls.items():
            runtimes[key] = open_gateway(url, db_url, workdir, args)
            stack.callback(runtimes[key].close)
            clients[key] = direct_client(runtimes[key].settings)
            close: Callable[[], None] = clients[key].close  # untyped in the client
            stack.callback(close)
        keep_alive = runtimes["ttft"].settings.keep_alive

        log(f"time to first token: {rounds_ttft} rounds of direct, gateway and direct again, interleaved")
        ttft = measure_ttft(clients["ttft"], runtimes["ttft"].gateway, keep_alive, rounds_ttft)
        for q, goal in ((50, ADDED_TTFT_P50_GOAL_MS), (95, ADDED_TTFT_P95_GOAL_MS)):
            added = percentile(ttft.diffs, q)
            row = compare(
                f"time to first token p{q} (ms; {rounds_ttft} rounds, server TTFT {TTFT_S * 1000:.0f} ms)",
                percentile(ttft.gateway, q),
                percentile(ttft.direct, q),
                2,
            )
            row.added = f"{added:+.2f} (p{q} of rounds)"
            row.goal = f"added < {goal:g} ms"
            row.verdict = verdict(added < goal)
            rows.append(row)
        rows.append(
            Row(
                "  noise floor: a second direct request - the first (ms; p50 / p95)",
                "",
                "",
                "",
                f"{percentile(ttft.noise, 50):+.2f} / {percentile(ttft.noise, 95):+.2f}",
            )
        )
        for q in (50, 95):
            rows.append(
                Row(
                    f"  gateway before the backend call, p{q} (ms; stream() to Started: wall / CPU)",
                    f"{percentile(ttft.before_backend, q):.2f} / {percentile(ttft.before_backend_cpu, q):.2f}",
                )
            )
        notes.append(
            "added time to first token (gateway - direct, per round): "
            f"min {min(ttft.diffs):+.2f}, p50 {percentile(ttft.diffs, 50):+.2f}, "
            f"p95 {percentile(ttft.diffs, 95):+.2f}, p99 {percentile(ttft.diffs, 99):+.2f}, "
            f"max {max(ttft.diffs):+.2f} ms; of which after Started (gateway's Started to first token - direct "
            f"TTFT) p50 {percentile(ttft.after_started, 50):+.2f}, p95 {percentile(ttft.after_started, 95):+.2f} ms; "
            f"direct TTFT p50/p95/max {percentile(ttft.direct, 50):.2f}/"
            f"{percentile(ttft.direct, 95):.2f}/{max(ttft.direct):.2f} ms"
        )

        for callers in (1, MAX_CONCURRENT):
            log(
                f"throughput: {paced_tokens}-token answers at {PACED_TOKENS_PER_S:.0f} tok/s, {callers} caller(s)"
            )
            direct_rate, gateway_rate = measure_throughput(
                clients["paced"], runtimes["paced"].gateway, keep_alive, paced_tokens, callers, rounds
            )
            ratio = gateway_rate / direct_rate
            row = compare(
                f"throughput at {PACED_TOKENS_PER_S:,.0f} tok/s, {callers} caller{'s' if callers > 1 else ''}, "
                f"{paced_tokens:,}-token answers (tok/s{', summed' if callers > 1 else ''})",
                gateway_rate,
                direct_rate,
                1,
            )
            row.goal = f"ratio >= {THROUGHPUT_RATIO_GOAL}"
            row.verdict = verdict(ratio >= THROUGHPUT_RATIO_GOAL)
            rows.append(row)

        log(
            f"cost per chunk: unpaced {long_tokens}- and {long_tokens // 10}-token answers, {cost_rounds} rounds"
        )
        direct_cost, gateway_cost = measure_chunk_cost(
            clients["unpaced"], runtimes["unpaced"].gateway, keep_alive, long_tokens, cost_rounds
        )
        rows += [
            compare("CPU per chunk, unpaced (µs)", gateway_cost.cpu_us, direct_cost.cpu_us, 2),
            compare("wall time per chunk, unpaced (µs)", gateway_cost.wall_us, direct_cost.wall_us, 2),
            compare(
                "CPU per request besides chunks (ms)", gateway_cost.fixed_cpu_ms, direct_cost.fixed_cpu_ms, 2
            ),
        ]

        log(f"refusals: {MAX_CONCURRENT} generating and {QUEUE_SIZE} queued, then {refusals} refused")
        refusal = measure_refusals(runtimes["slow"], refusals)
        if refusal.busy_recorded != refusal.busy_expected:
            raise RuntimeError(
                f"{refusal.busy_expected} refusals but {refusal.busy_recorded} busy records in the audit store"
            )
        for q in (50, 95):
            value = percentile(refusal.gateway_ms, q)
            rows.append(
                Row(
                    f"refusal when full p{q} (ms; {refusals} refusals, each audited busy)",
                    f"{value:.2f}",
                    f"{percentile(refusal.admission_ms, q):.3f} (Admission.enter alone)",
                    goal=f"< {REFUSAL_GOAL_MS:g} ms",
                    verdict=verdict(value < REFUSAL_GOAL_MS),
                )
            )
        notes.append(
            f"refusals: {refusal.busy_recorded} busy records in the audit store for {refusal.busy_expected} "
            f"refusals (5 of them warm-up); slowest {max(refusal.gateway_ms):.2f} ms"
        )

        if args.profile:
            gateway = runtimes["ttft"].gateway
            profiles.append(profile_until_started(gateway, 100))
            unpaced = runtimes["unpaced"].gateway
            long_request = make_request(long_tokens)
            profiles.append(
                profile(
                    f"one {long_tokens:,}-token unpaced answer through the gateway",
                    lambda: run_gateway(unpaced, long_request),
                )
            )
            profiles.append(
                profile(
                    f"one {long_tokens:,}-token unpaced answer, direct",
                    lambda: run_direct(clients["unpaced"], long_request, keep_alive),
                )
            )
            slow = runtimes["slow"]
            profiles.append(
                profile(f"{refusals} refusals when full", lambda: measure_refusals(slow, refusals), limit=40)
            )

    print(table(rows))
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}"
        f"{', --quick' if quick else ''}; backend setting {args.backend!r}, rate limit {args.rate_limit!r}, "
        f"audit on SQLite; {time.perf_counter() - started:.0f} s in all. Direct (baseline): the official ollama "
        "client straight to the same simulator with the same request; simulators in child processes."
    )
    for note in notes:
        print(f"- {note}")
    for block in profiles:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
