"""Benchmark of the HTTP API: what clawdbot's OpenAI-compatible route adds, against the model server alone.

    python bench/api_bench.py [--rounds N] [--throughput-runs N]

One run measures both paths against the same simulated Ollama server (tests/ollama_sim.py, in a child process
so its threads do not compete with the measured clients for this process's GIL):

- direct: the official `ollama` client straight to the simulator, with the very request the gateway sends
  (the agent's system prompt and the conversation, num_ctx, num_predict, keep_alive, thinking off);
- API: the official `openai` client to `clawdbot run` (a real server process on a free port, SQLite audit log
  in a temporary directory), `POST /v1/chat/completions` with `stream=True` and an API key, to an agent on the
  same simulator. This path includes the key check, the agent read, the audit record written before the model
  is called, admission, context planning with the Qwen3 tokenizer, the thread hand-off and SSE encoding.

- added time to first token: a simulator with 50 ms to the first token; rounds of three requests, one at a time
  (direct, API, direct again, in an order that rotates each round), 20-token answers: the distribution of
  (API - direct) per round, and, as the noise floor of the machine, of (second direct - first direct);
- streaming throughput: 2,000-token answers paced at 1,000 tokens/s, tokens per second from each stream's
  first token to its last, API against direct, one caller at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import httpx
import ollama
import openai
from gateway_bench import MESSAGES, SimSpec, simulator
from openai.types.chat import ChatCompletionMessageParam
from report import log, markdown_table, percentile, verdict

from clawdbot.agents import AgentConfig, Agents
from clawdbot.api_keys import ApiKeys
from clawdbot.db import Database
from clawdbot.users import Users

REPO = Path(__file__).resolve().parents[1]
CLAWDBOT = str(Path(sys.executable).parent / "clawdbot")
MODEL = "qwen3:32b"
AGENT = "bench"
CONTEXT_BUDGET = 7500
MAX_OUTPUT_TOKENS = 2048
KEEP_ALIVE = "5m"
TTFT_TOKENS = 20
THROUGHPUT_TOKENS = 2000
ADDED_TTFT_P50_GOAL_MS = 5.0
ADDED_TTFT_P95_GOAL_MS = 10.0
THROUGHPUT_RATIO_GOAL = 0.98
SYSTEM_PROMPT = MESSAGES[0]["content"]
TURNS = MESSAGES[1:]


@dataclass(frozen=True)
class Timing:
    """One streamed answer: seconds from the call to the first and to the last token, and the token count."""

    first: float
    last: float
    tokens: int

    @property
    def ttft_ms(self) -> float:
        return self.first * 1000

    @property
    def rate(self) -> float:
        return (self.tokens - 1) / (self.last - self.first) if self.last > self.first else 0.0


def run_direct(client: ollama.Client, tokens: int) -> Timing:
    """The request the gateway's Ollama backend sends for the agent, through the official client."""
    start = time.perf_counter()
    chunks = client.chat(
        model=MODEL,
        messages=[{"role": "system", "content": SYSTEM_PROMPT}, *TURNS],
        think=False,
        stream=True,
        options={"num_ctx": CONTEXT_BUDGET + MAX_OUTPUT_TOKENS, "num_predict": tokens},
        keep_alive=KEEP_ALIVE,
    )
    return _timed(start, (chunk.message.content for chunk in chunks))


def run_api(client: openai.OpenAI, tokens: int) -> Timing:
    start = time.perf_counter()
    stream = client.chat.completions.create(
        model=f"agent:{AGENT}",
        messages=cast("list[ChatCompletionMessageParam]", TURNS),
        stream=True,
        max_tokens=tokens,
    )
    return _timed(start, (c.choices[0].delta.content if c.choices else None for c in stream))


def run_raw(client: httpx.Client, base_url: str, key: str, tokens: int) -> Timing:
    """The same request as `run_api` with plain httpx and a minimal SSE reader: clawdbot's share alone."""
    body = {"model": f"agent:{AGENT}", "messages": TURNS, "stream": True, "max_tokens": tokens}
    start = time.perf_counter()
    with client.stream(
        "POST", f"{base_url}/chat/completions", headers={"Authorization": f"Bearer {key}"}, json=body
    ) as response:
        texts = (
            json.loads(line[6:])["choices"][0]["delta"].get("content")
            for line in response.iter_lines()
            if line.startswith("data: {") and '"choices":[]' not in line
        )
        return _timed(start, texts)


def _timed(start: float, texts: Iterator[str | None]) -> Timing:
    first = last = 0.0
    count = 0
    for text in texts:
        if text:
            last = time.perf_counter() - start
            if not count:
                first = last
            count += 1
    if not count:
        raise RuntimeError("the answer had no tokens")
    return Timing(first, last, count)


@contextmanager
def clawdbot_server(ollama_url: str, workdir: Path) -> Iterator[tuple[str, str]]:
    """`clawdbot run` on a free port with an agent and a user's API key; yields (base URL, key)."""
    db_url = f"sqlite:///{workdir / 'clawdbot.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLAWDBOT_")}
    env.update(
        CLAWDBOT_DATABASE_URL=db_url,
        CLAWDBOT_DATA_DIR=str(workdir / "data"),
        OLLAMA_HOST=ollama_url,
        CLAWDBOT_BACKEND="ollama",
        CLAWDBOT_RATE_LIMIT="",
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log_file = (workdir / "server.log").open("w")
    proc = subprocess.Popen(
        [CLAWDBOT, "run", "--port", str(port)],
        cwd=workdir,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"clawdbot run did not start:\n{(workdir / 'server.log').read_text()}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        db = Database(db_url)
        Users(db).add("bench", "bench", ["staff"], "correct horse battery")
        config = AgentConfig(
            model=MODEL,
            system_prompt=SYSTEM_PROMPT,
            context_budget=CONTEXT_BUDGET,
            max_output_tokens=MAX_OUTPUT_TOKENS,
            think=False,
        )
        Agents(db).add("bench", AGENT, config)
        key = ApiKeys(db).create("bench", "bench", "api_bench").secret
        db.dispose()
        yield f"{url}/v1", key
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log_file.close()


def rounds_of(runs: int, direct: Callable[[], Timing], others: dict[str, Callable[[], Timing]]) -> Rounds:
    """`runs` rounds of direct, each other path, direct again, in an order that rotates each round."""
    result = Rounds()
    paths = ["direct", *others, "direct"]
    for i in range(runs):
        order = paths[i % len(paths) :] + paths[: i % len(paths)]
        directs: list[Timing] = []
        got: dict[str, Timing] = {}
        for path in order:
            if path == "direct":
                directs.append(direct())
            else:
                got[path] = others[path]()
        baseline = statistics.mean(t.ttft_ms for t in directs)
        result.direct += directs
        result.noise.append(directs[1].ttft_ms - directs[0].ttft_ms)
        for path, timing in got.items():
            result.paths.setdefault(path, []).append(timing)
            result.added.setdefault(path, []).append(timing.ttft_ms - baseline)
    return result


@dataclass
class Rounds:
    direct: list[Timing] = field(default_factory=list)
    noise: list[float] = field(default_factory=list)
    """A second direct request's time to first token minus the first's: what the machine alone varies."""
    paths: dict[str, list[Timing]] = field(default_factory=dict)
    added: dict[str, list[float]] = field(default_factory=dict)
    """Per path and round: its time to first token minus the mean of the round's two direct requests."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=60, help="rounds for the time to first token")
    parser.add_argument("--throughput-runs", type=int, default=3, help="2,000-token answers per path")
    args = parser.parse_args(argv)

    spec = SimSpec("paced", ttft=0.05, tokens_per_s=1000.0, default_tokens=THROUGHPUT_TOKENS)
    with tempfile.TemporaryDirectory() as tmp, simulator(spec) as sim_url:
        log(f"simulator at {sim_url}; starting clawdbot run")
        with clawdbot_server(sim_url, Path(tmp)) as (base_url, key):
            direct_client = ollama.Client(host=sim_url)
            api_client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)
            raw_client = httpx.Client(timeout=60)

            def paths(tokens: int) -> dict[str, Callable[[], Timing]]:
                return {
                    "openai": lambda: run_api(api_client, tokens),
                    "httpx": lambda: run_raw(raw_client, base_url, key, tokens),
                }

            log("warming up")
            rounds_of(5, lambda: run_direct(direct_client, TTFT_TOKENS), paths(TTFT_TOKENS))
            log(f"time to first token: {args.rounds} rounds")
            ttft = rounds_of(args.rounds, lambda: run_direct(direct_client, TTFT_TOKENS), paths(TTFT_TOKENS))
            log(f"throughput: {args.throughput_runs} answers of {THROUGHPUT_TOKENS} tokens per path")
            rates = rounds_of(
                args.throughput_runs,
                lambda: run_direct(direct_client, THROUGHPUT_TOKENS),
                {"openai": lambda: run_api(api_client, THROUGHPUT_TOKENS)},
            )
    print(markdown_table(HEADER, result_rows(ttft, rates)))
    return 0


HEADER = ["Measure", "Through clawdbot", "Direct (ollama client)", "Ratio", "Added (noise)", "Goal", ""]
LABELS = {"openai": "openai client", "httpx": "plain httpx"}


def result_rows(ttft: Rounds, rates: Rounds) -> list[list[str]]:
    rows: list[list[str]] = []
    direct_ttft = [t.ttft_ms for t in ttft.direct]
    for path in ttft.paths:
        path_ttft = [t.ttft_ms for t in ttft.paths[path]]
        for q, goal in ((50, ADDED_TTFT_P50_GOAL_MS), (95, ADDED_TTFT_P95_GOAL_MS)):
            added = percentile(ttft.added[path], q)
            judged = path == "openai"  # the goal is about the official clients; httpx shows clawdbot's share
            rows.append(
                [
                    f"time to first token p{q} (ms), {LABELS[path]}",
                    f"{percentile(path_ttft, q):.2f}",
                    f"{percentile(direct_ttft, q):.2f}",
                    f"{percentile(path_ttft, q) / percentile(direct_ttft, q):.3f}",
                    f"{added:.2f} ({percentile(ttft.noise, q):.2f})",
                    f"added < {goal:g} ms" if judged else "",
                    verdict(added < goal) if judged else "",
                ]
            )
    d_rate = statistics.median(t.rate for t in rates.direct)
    a_rate = statistics.median(t.rate for t in rates.paths["openai"])
    rows.append(
        [
            "streaming throughput (tokens/s), openai client",
            f"{a_rate:,.0f}",
            f"{d_rate:,.0f}",
            f"{a_rate / d_rate:.3f}",
            "",
            f">= {THROUGHPUT_RATIO_GOAL:g} x direct",
            verdict(a_rate / d_rate >= THROUGHPUT_RATIO_GOAL),
        ]
    )
    return rows


if __name__ == "__main__":
    sys.exit(main())
