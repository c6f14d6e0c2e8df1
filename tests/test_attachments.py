"""Attachments: hostile files refused in plain words by a confined reader, real-world PDFs read, files stored
once by content, and long documents sent as an outline and the passages that matter, within the budget.

Every file goes through the real child process (`clawdbot.extraction`); turns run through a real runtime
(gateway, audit store, database) against the Ollama simulator.
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from clawdbot import extraction
from clawdbot.agents import AgentConfig
from clawdbot.attachments import AttachmentStore, Upload, display_name
from clawdbot.chat import TurnStarted
from clawdbot.db import Database
from clawdbot.documents import Document, read_pages, search_passages
from clawdbot.errors import RejectedInputError
from clawdbot.extraction import Limits, extract
from clawdbot.gateway import Finished
from clawdbot.models import Attachment, Status
from clawdbot.ranking import terms
from clawdbot.runtime import Runtime
from clawdbot.settings import load_settings
from tests import hostile_files as hostile
from tests.helpers import all_requests
from tests.ollama_sim import OllamaSimulator

MODEL = "qwen3:32b"
REAL_PDFS = Path("/work/shared/testdata/pdf")
MB = 1024 * 1024

# Each hostile file and the words its outcome must contain: a refusal's sentence, or text that was read.
OUTCOMES = {
    "encrypted": "this PDF is password-protected",
    "owner_password_rc4": "Readable despite the rules",
    "owner_password_aes": "Readable despite the rules",
    "truncated": "this PDF is damaged and could not be read",
    "not_a_pdf": "this file is not a PDF",
    "circular_xref": "Round and round",
    "thousands_of_pages": "this PDF has 5,000 pages; the limit is 1,000",
    "decompression_bomb": "this PDF is built to expand beyond safe limits",
    "zero_bytes": "the file is empty (0 bytes)",
    "zip_bomb": "looks like a zip bomb",
    "huge_declared": "this workbook expands to more than 200 MB",
    "entity_expansion": "this workbook declares XML entities",
    "entity_expansion_hidden": "this workbook declares XML entities",
    "lying_dimension": "Oslo | 7",
    "understated_dimension": "item 499 | 499",
    "rows_300k": "this workbook has more than 100,000 rows",
    "rows_300k_csv": "this CSV file has more than 100,000 rows",
    "corrupt_zip": "this workbook is damaged and could not be read",
    "garbage_zip": "this workbook is damaged: its zip structure cannot be read",
    "macro": "Berlin | 120",
}


def outcome(name: str, data: bytes, limits: Limits | None = None) -> str:
    """The refusal's sentence, or the whole extracted text."""
    try:
        return "\n".join(extract(name, data, limits or Limits()).pages)
    except RejectedInputError as exc:
        return exc.message


@pytest.mark.parametrize("case", sorted(hostile.HOSTILE))
def test_each_hostile_file_ends_in_a_plain_refusal_or_the_right_text(case: str) -> None:
    name, make = hostile.HOSTILE[case]
    assert outcome(name, make()).count(OUTCOMES[case]) >= 1, outcome(name, make())
    # The readers ran in child processes, none of which came near 500 MB (ru_maxrss is in KiB on Linux).
    assert resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss < 500 * 1024


def test_the_whole_set_is_covered() -> None:
    assert set(OUTCOMES) == set(hostile.HOSTILE)


def test_a_macro_workbook_is_read_with_typed_cells_and_a_note_that_macros_were_ignored() -> None:
    name, make = hostile.HOSTILE["macro"]
    read = extract(name, make(), Limits())
    [table] = read.tables
    assert (table.name, table.columns) == ("Sales", ["City", "Sales"])
    assert table.rows == [["Berlin", 120], ["Paris", 95.5], ["Madrid", 80]]
    assert read.notes == ["this workbook contains macros: they were ignored, only the cell values were read"]


def test_a_workbook_whose_dimension_tag_lies_is_read_by_its_real_rows() -> None:
    read = extract("dimension.xlsx", hostile.lying_dimension_workbook(), Limits())
    assert read.tables[0].rows == [["Oslo", 7], ["Lima", 9], ["Pune", 11]]


def test_csv_cells_are_typed_and_postcodes_stay_text() -> None:
    data = b"city;sales;postcode;share\nBerlin;120;01067;0.25\nParis;95,5;75001;\n"
    [table] = extract("sales.csv", data, Limits()).tables
    assert table.columns == ["city", "sales", "postcode", "share"]
    assert table.rows == [["Berlin", 120, "01067", 0.25], ["Paris", "95,5", 75001, None]]


def test_a_reader_over_its_time_or_memory_limit_is_stopped_with_a_plain_sentence() -> None:
    slow = outcome("rows.xlsx", hostile.many_rows_workbook(60_000), Limits(seconds=0.2))
    assert slow.startswith("reading this file took longer than 0.2 seconds, so it was stopped")
    hungry = outcome("bomb.pdf", hostile.bomb_pdf(60), Limits(memory_mb=100))
    assert hungry == "reading this file needs more than 100 MB of memory, so it was stopped"


def test_size_and_kind_are_refused_before_any_reader_starts() -> None:
    assert (
        outcome("big.txt", b"x" * (2 * MB), Limits(max_bytes=MB))
        == "the file is 2.0 MB; the limit is 1 MB per file"
    )
    assert outcome("old.xls", b"\xd0\xcf\x11\xe0" + b"\0" * 100).startswith("old Excel (.xls)")
    assert outcome("notes.docx", hostile.small_workbook()).startswith("Word files are not supported")
    assert outcome("tool.exe", b"MZ\x90\x00\x03\x00\x00\x00").startswith("this kind of file is not supported")


@pytest.mark.parametrize(
    ("file", "expected"),
    [
        ("pm-issue-566-chinese.pdf", "甲方：中国饮料有限公司"),
        ("sf-habibi-arabic.pdf", "حَبيبي"),
        ("sf-multicolumn.pdf", "Two-Column Document"),
        ("pm-zen-corrupted-xref.pdf", "Beautiful is better than ugly."),
        ("pm-identity-cmap-polish.pdf", "Faktura nr FV 1/2021"),
        ("sf-libreoffice-writer-password.pdf", "this PDF is password-protected"),
    ],
)
def test_real_world_pdfs(file: str, expected: str) -> None:
    assert expected in outcome(file, (REAL_PDFS / file).read_bytes())


# -- pages and passages (what `read_document` calls) ---------------------------------------------------------


def test_read_pages_clamps_marks_pages_and_caps_its_length() -> None:
    doc = Document("a.pdf", "0" * 64, "pdf", pages=["first page", "second page", "third page"])
    assert read_pages(doc, 2, 3) == "[page 2]\nsecond page\n\n[page 3]\nthird page"
    assert read_pages(doc, -5, 99).count("[page") == 3
    assert read_pages(doc, 3, 1) == "[page 3]\nthird page"
    capped = read_pages(doc, 1, 3, max_chars=30)
    assert capped.endswith("[… cut at 30 characters: read again from page 2 …]")
    assert read_pages(Document("e.pdf", "0" * 64, "pdf"), 1, 2) == "e.pdf has no text."


def test_search_finds_chinese_and_english_passages_on_their_pages() -> None:
    doc = Document(
        "mixed.pdf",
        "0" * 64,
        "pdf",
        pages=[
            "The board met in Oslo. Revenue grew in the north.",
            "合同约定，甲方应在三十天内支付货款。逾期付款将产生违约金。",
            "Shipping costs rose because fuel prices went up.",
        ],
    )
    [best, *_] = search_passages(doc, "违约金是多少？")
    assert best.page == 2
    [fuel] = search_passages(doc, "why did shipping get more expensive", k=1)
    assert fuel.page == 3 and fuel.score > 0
    assert search_passages(doc, "zebra") == []
    assert terms("北京大学 Big DATA") == ["北京", "京大", "大学", "big", "data"]


# -- storage -------------------------------------------------------------------------------------------------


def test_files_are_stored_once_by_content_and_names_never_reach_a_path(tmp_path: Path, db: Database) -> None:
    store = AttachmentStore(db, load_settings(database_url=db.url, data_dir=tmp_path / "data"))
    data = hostile.report_pdf(3)
    first = store.read(Upload("../../../etc/passwd.pdf", data))
    again = store.read(Upload("C:\\Users\\x\\copy of report.pdf", data))
    assert (first.name, again.name) == ("passwd.pdf", "copy of report.pdf")
    assert first.sha256 == again.sha256 and first.path == again.path
    stored = sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file())
    sha = first.sha256
    assert stored == [f"{sha[:2]}/{sha}", f"{sha[:2]}/{sha}.pdf.json"]
    assert (store.root / sha[:2] / sha).read_bytes() == data
    assert display_name("\x00\x1b[31mevil\n.txt") == "[31mevil.txt"


def test_a_second_store_reads_the_stored_content_without_a_reader(tmp_path: Path, db: Database) -> None:
    settings = load_settings(database_url=db.url, data_dir=tmp_path / "data")
    data = hostile.small_workbook()
    AttachmentStore(db, settings).read(Upload("a.xlsx", data))
    # With no time at all for a reader, only the stored extraction can answer.
    later = AttachmentStore(db, settings)
    later.limits = Limits(seconds=0.000_001)
    assert later.read(Upload("b.xlsx", data)).extracted.tables[0].rows[0] == ["Berlin", 120]


# -- turns ---------------------------------------------------------------------------------------------------


@pytest.fixture
def runtime(workdir: Path, db: Database, sim: OllamaSimulator) -> Iterator[Runtime]:
    settings = load_settings(
        database_url=db.url, data_dir=workdir / "data", ollama_host=sim.url, backend="ollama", rate_limit="",
        retries=0,
    )  # fmt: skip
    rt = Runtime(settings)
    rt.users.add("test", "alice", ["staff"], "correct horse battery")
    rt.agents.add("test", "helper", AgentConfig(model=MODEL, system_prompt="Be brief.", think=False))
    yield rt
    rt.close()


def turn(
    rt: Runtime, prompt: str, *files: tuple[str, bytes], conversation: int | None = None
) -> list[object]:
    uploads = [Upload(name, data) for name, data in files]
    agent = None if conversation is not None else "helper"
    return list(rt.chat.turn("alice", prompt, agent=agent, conversation_id=conversation, attachments=uploads))


def sent_message(sim: OllamaSimulator) -> str:
    return str(sim.requests[-1]["body"]["messages"][-1]["content"])


def test_summarise_a_23_page_pdf_stays_inside_the_budget(runtime: Runtime, sim: OllamaSimulator) -> None:
    sim.script("A summary.")
    events = turn(runtime, "Summarise this 23-page PDF", ("report.pdf", hostile.report_pdf(23)))
    started, finished = events[0], events[-1]
    assert isinstance(started, TurnStarted) and isinstance(finished, Finished)
    assert finished.status is Status.OK
    [record] = all_requests(runtime.db)
    assert record.prompt_tokens is not None and record.prompt_tokens <= 7500
    assert not record.truncated  # fitted here, so the context planner had nothing to cut
    sent = sent_message(sim)
    assert sent.startswith("Summarise this 23-page PDF\n\n")
    assert "p. 1: Chapter 1: Staffing review" in sent and "p. 23: Chapter 23: Training review" in sent
    pages = {int(line[6:-1]) for line in sent.splitlines() if line.startswith("[page ")}
    assert len(pages) >= 15 and {1, 23} <= pages  # passages from all over the document
    assert "In section 9.39" not in sent or "In section 9.1 " in sent  # whole passages, in page order
    [note] = started.notes
    assert note.startswith("report.pdf is longer than the context budget: the model gets its outline")
    assert '"pages": 23' in record.attachments and '"name": "report.pdf"' in record.attachments


def test_a_question_brings_the_passage_that_answers_it(runtime: Runtime, sim: OllamaSimulator) -> None:
    sim.script("It flooded.")
    turn(runtime, "What happened to the warehouse in Rotterdam?", ("report.pdf", hostile.report_pdf(23)))
    assert "The warehouse in Rotterdam flooded in March" in sent_message(sim)


def test_later_turns_see_the_conversations_files_and_the_rows_link_them(
    runtime: Runtime, sim: OllamaSimulator
) -> None:
    sim.script("Berlin.")
    events = turn(runtime, "Which city sold most?", ("sales.xlsx", hostile.small_workbook()))
    conversation = events[0].conversation_id  # type: ignore[attr-defined]
    assert "Berlin | 120" in sent_message(sim)
    sim.script("Madrid.")
    turn(runtime, "And the least?", conversation=conversation)
    assert "Madrid | 80" in sent_message(sim)
    [doc] = runtime.chat.attachments.documents(conversation)
    assert doc.table() is not None and doc.table().rows[2] == ["Madrid", 80]  # type: ignore[union-attr]
    with runtime.db.read() as session:
        [row] = session.scalars(select(Attachment)).all()
        assert (row.name, row.rows, row.pages, row.conversation_id) == ("sales.xlsx", 3, None, conversation)
    first = all_requests(runtime.db)[0]
    assert row.request_id == first.id
    names = runtime.chat.attachments.names_by_request(conversation)
    assert names == {first.id: ["sales.xlsx"]}


def test_a_refused_file_is_recorded_as_rejected_input_and_the_next_turn_is_answered(
    runtime: Runtime, sim: OllamaSimulator
) -> None:
    [finished] = turn(runtime, "Read this", ("ok.txt", b"fine"), ("laughs.xlsx", hostile.entity_workbook()))
    assert isinstance(finished, Finished) and finished.status is Status.REJECTED_INPUT
    assert finished.message.startswith("laughs.xlsx: this workbook declares XML entities")
    [record] = all_requests(runtime.db)
    assert (record.status, record.error) == ("rejected_input", finished.message)
    assert '"refused": "this workbook declares XML entities' in record.attachments
    assert sim.requests == []  # nothing reached the model
    with runtime.db.read() as session:
        assert {
            (a.name, a.text_path == "", a.conversation_id) for a in session.scalars(select(Attachment))
        } == {
            ("ok.txt", False, None),
            ("laughs.xlsx", True, None),
        }
    sim.script("Hello.")
    assert turn(runtime, "Still there?")[-1].status is Status.OK  # type: ignore[attr-defined]


def test_a_file_without_a_question_asks_for_a_summary(runtime: Runtime, sim: OllamaSimulator) -> None:
    sim.script("Short.")
    turn(runtime, "  ", ("notes.txt", b"Meeting notes: ship on Friday."))
    assert sent_message(sim).startswith("Summarise the attached file.\n\n")
    assert "ship on Friday" in sent_message(sim)


def test_when_every_reader_is_busy_the_file_is_refused_and_recorded_not_lost(
    runtime: Runtime, sim: OllamaSimulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(extraction, "_WAIT_FOR_SLOT_S", 0.05)
    taken = [extraction._running.acquire(timeout=5) for _ in range(2)]
    try:
        [finished] = turn(runtime, "Read it", ("notes.txt", b"some notes"))
    finally:
        for _ in taken:
            extraction._running.release()
    assert isinstance(finished, Finished) and finished.status is Status.REJECTED_INPUT
    assert finished.message == "notes.txt: too many files are being read right now: try again in a minute"
    assert [r.status for r in all_requests(runtime.db)] == ["rejected_input"]
