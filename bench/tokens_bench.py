"""Benchmark of token counting and context planning: what the per-message cache saves on every request.

    python bench/tokens_bench.py [--runs N] [--turns N] [--budget N] [--profile]

Every request is counted and planned with the serving model's tokenizer before it is sent (`Gateway._plan`), so
this runs on the path to the first token. Measured with `clawdbot.tokens.QwenCounter` (Qwen3 through Ollama's
template, as `counter_for("qwen3:32b", "ollama")` gives it) and `clawdbot.context.plan_context`, on conversations
of mixed English, Chinese and code with a tool call and its result every tenth turn, every message distinct:

- counting a context of about `--budget` tokens (many messages) with the counter's per-message cache warm
  (the context was counted before, as the previous turn's context mostly was), against counting it with a fresh
  counter, which tokenizes every piece from scratch;
- planning a `--turns`-turn conversation into the budget (`plan_context`: counts the whole conversation, every
  message, then the kept part) with the cache warm, against the same planning with a fresh counter;
- the incremental case the chat page meets: the conversation planned at turn `--turns` - 1, then one turn added
  (the previous answer and the new question) and planned again with the same counter; only the second planning is
  timed. Its baseline is the same turn planned with a fresh counter.

Each figure is the median and the 95th percentile of `--runs` runs, warm and fresh runs interleaved so that the
machine's load falls on both alike; a fresh counter is built before its run starts (building one costs next to
nothing: the vocabulary is loaded once per process). Counts are checked: the cached count, the fresh count and
tiktoken over the whole rendered prompt must agree, and warm and fresh planning must choose the same messages.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import random
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from report import log, markdown_table, percentile, verdict

from clawdbot.context import ContextPlan, cut_text, plan_context
from clawdbot.tokens import QwenCounter, counter_for

COUNT_GOAL_MS = 5.0
PLAN_GOAL_MS = 10.0

# --- realistic content ---------------------------------------------------------------------------------------

SYSTEM = {
    "role": "system",
    "content": (
        "You are the finance team's assistant. Answer in the language of the question, cite the attachment and "
        "the page you rely on, and say so when the data does not support an answer. 回答要简洁，必要时给出表格。"
    ),
}
_EN = (
    "The quarterly report shows revenue up 12% against the plan, driven by the Shanghai and Berlin offices; "
    "travel costs fell after the new policy, but the cloud bill grew faster than usage. ",
    "Could you compare the indemnity clause in section 4.2 with last year's contract and list what changed? ",
    "Deadline moved to Friday: the auditors want the reconciled ledger, the bank statements and a short note. ",
)
_ZH = (
    "第二季度收入同比增长百分之十二，主要来自上海和柏林办事处；差旅费用在新政策实施后有所下降。",
    "请把附件中的供应商名单按地区汇总，并标出付款期限超过六十天的合同。",
    "审计团队需要核对总账、银行对账单以及本月的费用报销明细，周五之前提交。",
)
_CODE = (
    "```python\ndef overdue(invoices):\n    return [i for i in invoices if i['days'] > 60 and not i['paid']]\n```\n",
    "```sql\nSELECT region, SUM(amount) AS total\nFROM invoices\nWHERE paid_at IS NULL\nGROUP BY region;\n```\n",
    "```python\nimport pandas as pd\ndf = pd.read_excel('ledger.xlsx')\nprint(df.groupby('account').sum())\n```\n",
)


def _mixed(rng: random.Random, turn: int, pieces: int) -> str:
    """`pieces` sentences or snippets of English, Chinese and code, made distinct by the turn and a rotation."""
    parts = [f"[{turn}] "]
    for _ in range(pieces):
        text = rng.choice(rng.choice((_EN, _ZH, _CODE)))
        shift = rng.randrange(len(text))
        parts.append(text[shift:] + text[:shift])
    return "".join(parts)


def conversation(turns: int, seed: int = 7) -> list[list[dict[str, Any]]]:
    """`turns` turns (user question, answer; every tenth turn a tool call and its result in between)."""
    rng = random.Random(seed)
    result: list[list[dict[str, Any]]] = []
    for turn in range(turns):
        messages: list[dict[str, Any]] = [{"role": "user", "content": _mixed(rng, turn, rng.randint(1, 4))}]
        if turn % 10 == 5:
            call = {"function": {"name": "query_table", "arguments": {"sheet": "invoices", "top": turn % 7}}}
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            messages.append(
                {
                    "role": "tool",
                    "content": f"[{turn}] Shanghai 120; Berlin 95; Austin 80; 深圳 64",
                    "tool_name": "query_table",
                }
            )
        messages.append({"role": "assistant", "content": _mixed(rng, turn, rng.randint(2, 8))})
        result.append(messages)
    return result


def request_at(turns: list[list[dict[str, Any]]], turn: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The history and the new message of the request made at `turn` (1-based): earlier turns whole, then its
    question."""
    history = [m for t in turns[: turn - 1] for m in t]
    return history, turns[turn - 1][0]


def context_of(counter: QwenCounter, turns: list[list[dict[str, Any]]], budget: int) -> list[dict[str, Any]]:
    """The system prompt, as many of the most recent whole turns as fit in `budget` tokens, and a question
    lengthened (with an attachment's worth of notes) to fill the budget to the token."""
    question = "Summarise what we decided about the overdue invoices. 请列出要点。\n\nAttached notes:\n"
    best = [SYSTEM, {"role": "user", "content": question}]
    for start in range(len(turns) - 1, -1, -1):
        messages = [SYSTEM, *(m for t in turns[start:] for m in t), {"role": "user", "content": question}]
        if counter.count_messages(messages) > budget:
            break
        best = messages
    notes = _mixed(random.Random(1), 9999, 200)
    room = budget - counter.count_messages(best)
    while room >= 0:
        filled = [*best[:-1], {"role": "user", "content": question + cut_text(counter, notes, room)}]
        if counter.count_messages(filled) <= budget:
            return filled
        room -= 1  # a token merged across the join
    return best


# --- measurements --------------------------------------------------------------------------------------------


def fresh_counter() -> QwenCounter:
    """A counter with an empty cache, as the process's shared one is before its first request."""
    return QwenCounter("ollama")


@dataclass
class Timings:
    """Milliseconds per run: wall time, and CPU time of the thread (which time spent descheduled, waiting for a
    core the machine's other work holds, does not inflate)."""

    warm: list[float] = field(default_factory=list)
    fresh: list[float] = field(default_factory=list)
    warm_cpu: list[float] = field(default_factory=list)
    fresh_cpu: list[float] = field(default_factory=list)


Run = Callable[[], object]


def interleaved(runs: int, prepare_warm: Callable[[], Run], prepare_fresh: Callable[[], Run]) -> Timings:
    """`runs` timings (ms) of a warm and a fresh run each, alternating which goes first. The `prepare_` functions
    build one run (its counter, and whatever must precede it) outside the timing."""
    result = Timings()
    gc.collect()
    for run in range(runs):
        warm, fresh = prepare_warm(), prepare_fresh()
        order = ((warm, result.warm, result.warm_cpu), (fresh, result.fresh, result.fresh_cpu))
        for work, wall, cpu in order if run % 2 == 0 else order[::-1]:
            cpu_started = time.thread_time()
            started = time.perf_counter()
            work()
            wall.append((time.perf_counter() - started) * 1000)
            cpu.append((time.thread_time() - cpu_started) * 1000)
    return result


def on_fresh_counter(call: Callable[[QwenCounter], object]) -> Callable[[], Run]:
    """What builds a fresh run of `call`: a new counter, then `call(counter)` when the run is started."""

    def prepare() -> Run:
        counter = fresh_counter()
        return lambda: call(counter)

    return prepare


def same_plan(a: ContextPlan, b: ContextPlan) -> bool:
    return (a.messages, a.tokens_before, a.tokens_after, len(a.dropped)) == (
        b.messages,
        b.tokens_before,
        b.tokens_after,
        len(b.dropped),
    )


# --- output --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    measure: str
    result: str
    baseline: str = ""
    ratio: str = ""
    goal: str = ""
    verdict: str = ""


def table(rows: list[Row]) -> str:
    header = ("Measure", "Result", "Baseline", "Ratio", "Goal", "")
    cells = [(r.measure, r.result, r.baseline, r.ratio, r.goal, r.verdict) for r in rows]
    return markdown_table(header, cells)


def timing_rows(measure: str, timings: Timings, baseline: str, goal_ms: float) -> list[Row]:
    """Rows for the median and the p95 wall time of the warm runs, each against the same percentile of the fresh
    ones and checked against the goal; then the CPU time of both, median / p95, for comparison."""
    rows = []
    for q, label in ((50, "median"), (95, "p95")):
        warm, fresh = percentile(timings.warm, q), percentile(timings.fresh, q)
        rows.append(
            Row(
                f"{measure}, {label} (ms)",
                f"{warm:,.2f}",
                f"{fresh:,.2f} ({baseline})",
                f"{warm / fresh:.3f}" if fresh > 0 else "",
                f"< {goal_ms:g} ms",
                verdict(warm < goal_ms),
            )
        )
    cpu = [percentile(timings.warm_cpu, q) for q in (50, 95)]
    fresh_cpu = [percentile(timings.fresh_cpu, q) for q in (50, 95)]
    rows.append(
        Row(
            "  the same, CPU time of the thread, median / p95 (ms)",
            f"{cpu[0]:,.2f} / {cpu[1]:,.2f}",
            f"{fresh_cpu[0]:,.2f} / {fresh_cpu[1]:,.2f}",
            f"{cpu[0] / fresh_cpu[0]:.3f}" if fresh_cpu[0] > 0 else "",
        )
    )
    return rows


def profile(label: str, work: Callable[[], object], repeat: int, limit: int = 25) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(repeat):
        work()
    profiler.disable()
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(limit)
    return f"\n--- profile: {label} ({repeat} runs) ---\n{out.getvalue()}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=200, help="timed runs of each measure (default 200)")
    parser.add_argument(
        "--turns", type=int, default=200, help="turns of the planned conversation (default 200)"
    )
    parser.add_argument("--budget", type=int, default=7500, help="context budget in tokens (default 7,500)")
    parser.add_argument("--profile", action="store_true", help="print cProfile listings of the warm paths")
    args = parser.parse_args(argv)
    runs, budget = args.runs, args.budget
    if runs < 1 or args.turns < 2 or budget < 500:
        parser.error("--runs must be at least 1, --turns at least 2 and --budget at least 500")

    started = time.perf_counter()
    log("loading the Qwen3 vocabulary")
    shared = counter_for("qwen3:32b", "ollama")
    if not isinstance(shared, QwenCounter):
        raise RuntimeError(f"expected the Qwen counter for qwen3:32b on Ollama, got {shared.name}")
    turns = conversation(args.turns)
    rows: list[Row] = []
    notes: list[str] = []
    profiles: list[str] = []

    # 1. Counting a context of about the budget.
    context = context_of(fresh_counter(), turns, budget)
    warm_counter = fresh_counter()
    tokens = warm_counter.count_messages(context)
    whole = len(warm_counter.encode(warm_counter.render_prompt(context)))
    if not tokens == fresh_counter().count_messages(context) == whole:
        raise RuntimeError(f"counts disagree: cached pieces {tokens}, whole prompt {whole}")
    log(f"counting a {tokens:,}-token context of {len(context)} messages: {runs} warm and {runs} fresh runs")
    timings = interleaved(
        runs,
        lambda: lambda: warm_counter.count_messages(context),
        on_fresh_counter(lambda counter: counter.count_messages(context)),
    )
    rows += timing_rows(
        f"count a {tokens:,}-token context, {len(context)} messages, cache warm",
        timings,
        "fresh counter",
        COUNT_GOAL_MS,
    )
    prompt_text = warm_counter.render_prompt(context)
    encode_ms = []
    for _ in range(min(runs, 50)):
        t0 = time.perf_counter()
        warm_counter.encode(prompt_text)
        encode_ms.append((time.perf_counter() - t0) * 1000)
    notes.append(
        f"tiktoken alone over the whole rendered prompt ({len(prompt_text):,} characters, {whole:,} tokens): "
        f"median {statistics.median(encode_ms):.2f} ms, i.e. {whole / statistics.median(encode_ms) / 1000:.2f} "
        "M tokens/s; the fresh count differs from it by the cost of rendering, hashing and caching the pieces"
    )
    if args.profile:
        profiles.append(profile("count, cache warm", lambda: warm_counter.count_messages(context), 200))

    # 2. Planning the whole conversation.
    history, new = request_at(turns, args.turns)
    plan_counter = fresh_counter()
    plan = plan_context(plan_counter, SYSTEM, history, new, budget)
    check = plan_context(fresh_counter(), SYSTEM, history, new, budget)
    if not same_plan(plan, check) or plan.tokens_after > budget:
        raise RuntimeError("warm and fresh planning disagree, or the plan exceeds the budget")
    log(
        f"planning turn {args.turns} ({len(history) + 1} messages, {plan.tokens_before:,} tokens): "
        f"{runs} warm and {runs} fresh runs"
    )

    def plan_turn(counter: QwenCounter) -> ContextPlan:
        return plan_context(counter, SYSTEM, history, new, budget)

    timings = interleaved(runs, lambda: lambda: plan_turn(plan_counter), on_fresh_counter(plan_turn))
    rows += timing_rows(
        f"plan turn {args.turns} ({len(history) + 1} messages, {plan.tokens_before:,} tokens), cache warm",
        timings,
        "fresh counter",
        PLAN_GOAL_MS,
    )
    notes.append(
        f"the plan of turn {args.turns}: {plan.tokens_before:,} tokens in all, {plan.tokens_after:,} sent in "
        f"{len(plan.messages)} messages, {len(plan.dropped)} earlier messages dropped (budget {budget:,})"
    )
    if args.profile:
        profiles.append(profile("plan, cache warm", lambda: plan_turn(plan_counter), 100))

    # 3. One turn more: turn N - 1 planned, then turn N with the same counter.
    before_history, before_new = request_at(turns, args.turns - 1)

    def counter_after_previous_turn() -> QwenCounter:
        counter = fresh_counter()
        plan_context(counter, SYSTEM, before_history, before_new, budget)
        return counter

    if not same_plan(plan_turn(counter_after_previous_turn()), plan):
        raise RuntimeError("planning after the previous turn disagrees with planning from scratch")

    def after_previous_turn() -> Run:
        counter = counter_after_previous_turn()
        return lambda: plan_turn(counter)

    log(f"turn {args.turns} after turn {args.turns - 1}: {runs} incremental and {runs} fresh runs")
    incremental = interleaved(runs, after_previous_turn, on_fresh_counter(plan_turn))
    rows += timing_rows(
        f"plan turn {args.turns} right after turn {args.turns - 1} (one turn added)",
        incremental,
        "fresh counter",
        PLAN_GOAL_MS,
    )
    if args.profile:
        profiles.append(
            profile(
                f"turn {args.turns - 1} then turn {args.turns}, both on a fresh counter",
                lambda: after_previous_turn()(),
                20,
            )
        )

    print(table(rows))
    print(
        f"\n{time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, Python {sys.version.split()[0]}; {runs} runs "
        f"of each, warm and fresh interleaved; {time.perf_counter() - started:.0f} s in all. Counter: "
        f"{shared.name} (QwenCounter, Ollama's qwen3 template). Baseline: the same call on a fresh counter "
        "(empty cache: every piece tokenized from scratch). Ratio: result / baseline."
    )
    for note in notes:
        print(f"- {note}")
    for block in profiles:
        print(block)
    return 0


if __name__ == "__main__":
    sys.exit(main())
