"""Benchmark of attachments: what reading in a confined child costs, how fast hostile files are refused, and
what fitting a long document into the context costs on the way to the first token.

    python bench/attachments_bench.py [--runs N]

Each figure is the median of `--runs` runs, next to a baseline measured in the same process just before:

- reading a 23-page PDF and a 10,000-row workbook through `extract` (child process, limits, JSON back) against
  the same library reading the same bytes in this process (pypdf, openpyxl read-only): the ratio is the price of
  the isolation;
- each hostile file's refusal (or reading) against starting an empty child Python, the floor of any read;
- `fit_documents`-style planning of the 23-page PDF into a 7,500-token budget with the Qwen3 counter, against
  counting the document's text once with the same counter;
- `search_passages` over a 1,000-page document against only splitting it into terms.
"""

from __future__ import annotations

import argparse
import io
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from report import log, markdown_table, verdict

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from clawdbot.document_context import add_documents
from clawdbot.documents import Document, search_passages
from clawdbot.errors import RejectedInputError
from clawdbot.extraction import Limits, extract
from clawdbot.gateway import ChatRequest
from clawdbot.ranking import terms
from clawdbot.tokens import counter_for
from tests import hostile_files as hostile

READ_GOAL_S = 2.0
REFUSAL_GOAL_S = 10.0
FIT_GOAL_MS = 300.0
SEARCH_GOAL_MS = 1_000.0


def median_s(action: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        action()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def read_or_refuse(name: str, data: bytes) -> str:
    try:
        extract(name, data, Limits())
        return "read"
    except RejectedInputError:
        return "refused"


def pypdf_in_process(data: bytes) -> None:
    from pypdf import PdfReader

    for page in PdfReader(io.BytesIO(data)).pages:
        page.extract_text()


def openpyxl_in_process(data: bytes) -> None:
    from openpyxl import load_workbook

    workbook = load_workbook(io.BytesIO(data), read_only=True, data_only=True)
    for sheet in workbook.worksheets:
        sheet.reset_dimensions()
        for _ in sheet.iter_rows(values_only=True):
            pass


def empty_child() -> None:
    subprocess.run([sys.executable, "-I", "-B", "-c", "pass"], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    rows: list[list[str]] = []

    log("reading files")
    report = hostile.report_pdf(23)
    workbook = hostile.many_rows_workbook(10_000)
    for label, name, data, baseline_label, baseline in (
        ("read 23-page PDF (s)", "report.pdf", report, "pypdf in process", lambda: pypdf_in_process(report)),
        ("read 10,000-row workbook (s)", "rows.xlsx", workbook, "openpyxl in process",
         lambda: openpyxl_in_process(workbook)),
    ):  # fmt: skip
        base = median_s(baseline, runs)
        result = median_s(lambda name=name, data=data: extract(name, data, Limits()), runs)  # type: ignore[misc]
        rows.append([label, f"{result:.2f}", f"{base:.2f} ({baseline_label})", f"{result / base:.2f}",
                     f"<= {READ_GOAL_S:g} s", verdict(result <= READ_GOAL_S)])  # fmt: skip

    log("hostile files")
    floor = median_s(empty_child, runs)
    for key, (name, make) in hostile.HOSTILE.items():
        data = make()
        outcome = read_or_refuse(name, data)
        result = median_s(lambda name=name, data=data: read_or_refuse(name, data), runs)  # type: ignore[misc]
        rows.append([f"{key}: {outcome} (s)", f"{result:.2f}", f"{floor:.2f} (empty child)", f"{result / floor:.1f}",
                     f"<= {REFUSAL_GOAL_S:g} s", verdict(result <= REFUSAL_GOAL_S)])  # fmt: skip

    log("fitting and searching")
    extracted = extract("report.pdf", report, Limits())
    doc = extracted.document("report.pdf", "0" * 64)
    counter = counter_for("qwen3:32b", "ollama")
    request = ChatRequest(
        user="bench", model="qwen3:32b", documents=(doc,),
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Summarise this PDF"}],
    )  # fmt: skip
    counter.count_text("warm up the vocabulary")
    base = median_s(lambda: counter.count_text(doc.text), runs)
    fit = median_s(lambda: add_documents(request, counter, 7_500), runs)
    rows.append(["fit 23-page PDF into 7,500 tokens (ms)", f"{fit * 1000:.0f}", f"{base * 1000:.0f} (count it once)",
                 f"{fit / base:.1f}", f"<= {FIT_GOAL_MS:g} ms", verdict(fit * 1000 <= FIT_GOAL_MS)])  # fmt: skip
    big = Document("big.txt", "0" * 64, "text", pages=[page for _ in range(44) for page in doc.pages][:1_000])
    base = median_s(lambda: [terms(p) for p in big.pages], runs)
    search = median_s(lambda: search_passages(big, "warehouse flooded Rotterdam"), runs)
    ok = search * 1000 <= SEARCH_GOAL_MS
    rows.append(["search 1,000 pages (ms)", f"{search * 1000:.0f}", f"{base * 1000:.0f} (terms only)",
                 f"{search / base:.1f}", f"<= {SEARCH_GOAL_MS:g} ms", verdict(ok)])  # fmt: skip

    print(markdown_table(["Measure", "Result", "Baseline", "Ratio", "Goal", ""], rows))


if __name__ == "__main__":
    main()
