"""Attached files: read once, stored once by content, and found again for every later turn of a conversation.

A file's bytes and its extracted content live under `<data dir>/attachments/<sha256[:2]>/`, named by the SHA-256
of the bytes only: the uploaded name never reaches a file system path (it is kept, cleaned, in the
`attachments` row and shown to people). The same file attached twice is stored and read once. Refused files are
not stored at all; their name, size, hash and the reason are kept in the audit record of the refused request
and in an `attachments` row without a stored copy.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from sqlalchemy import select

from clawdbot.db import Database
from clawdbot.documents import Document
from clawdbot.errors import ClawdbotError, RejectedInputError, UsageError
from clawdbot.extraction import MB, Extracted, Limits, detect_kind, extract
from clawdbot.models import Attachment
from clawdbot.settings import Settings

NAME_LIMIT = 255
# Most files one message may carry, so a request cannot spawn readers without end.
MAX_FILES = 10
_SHA256 = re.compile(r"[0-9a-f]{64}")
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f]")
MEDIA_TYPES = {
    "pdf": "application/pdf",
    "xlsx": "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
    "csv": "text/csv",
    "text": "text/plain",
}
KIND_LABELS = {"pdf": "PDF", "xlsx": "workbook", "csv": "CSV table", "text": "text"}
# Extracted documents kept in memory: each later turn of a conversation reads its attachments again.
_CACHED_DOCUMENTS = 16


@dataclass(frozen=True)
class Upload:
    """A file as a person sent it: a name (only for display) and its bytes.

    `size` is the real size when `data` was cut short because the file is over the limit (the CLI reads no
    more than the limit and one byte, so a huge file is refused without being loaded).
    """

    name: str
    data: bytes
    size: int | None = None

    @property
    def real_size(self) -> int:
        return self.size if self.size is not None else len(self.data)

    @property
    def complete(self) -> bool:
        return self.size is None or self.size == len(self.data)


@dataclass(frozen=True)
class ReadAttachment:
    """A file that was accepted and read; `record()` is what the request's `attachments` column keeps."""

    name: str
    sha256: str
    size: int
    extracted: Extracted
    path: str
    """The extracted content's path, relative to the attachments directory."""

    @property
    def document(self) -> Document:
        return self.extracted.document(self.name, self.sha256)

    def record(self) -> dict[str, Any]:
        pages = len(self.extracted.pages) if self.extracted.kind in ("pdf", "text") else None
        return {
            "name": self.name,
            "sha256": self.sha256,
            "size": self.size,
            "kind": self.extracted.kind,
            "pages": pages,
            "rows": self.extracted.rows,
            "notes": self.extracted.notes,
        }


@dataclass
class AttachmentBatch:
    """The files of one message: the ones read, and the first refusal (then nothing is sent to the model)."""

    read: list[ReadAttachment] = field(default_factory=list)
    refused: list[dict[str, Any]] = field(default_factory=list)
    refusal: str = ""

    @property
    def documents(self) -> tuple[Document, ...]:
        return tuple(a.document for a in self.read)

    @property
    def notes(self) -> list[str]:
        """What the person should know about files that were read (e.g. macros ignored), one line each."""
        return [f"{a.name}: {note}" for a in self.read for note in a.extracted.notes]

    def records(self) -> list[dict[str, Any]]:
        """For the audit record: every file with name, hash and size; refused ones with the reason."""
        return [*(a.record() for a in self.read), *self.refused]


def upload_from_path(path: Path, max_bytes: int) -> Upload:
    """A file named on the command line, read up to `max_bytes` and one byte (a larger one is refused by size
    without being loaded); raises UsageError when it cannot be read at all."""
    try:
        with path.open("rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            data = fh.read(max_bytes + 1)
    except FileNotFoundError:
        raise UsageError(f"cannot attach {path}: there is no such file") from None
    except IsADirectoryError:
        raise UsageError(
            f"cannot attach {path}: it is a directory; attach the files in it one by one"
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot attach {path}: {exc.strerror or exc}") from None
    return Upload(path.name, data, size=max(size, len(data)) if len(data) > max_bytes else None)


def display_name(name: str) -> str:
    """The uploaded name as shown and stored: its last path part, printable, at most 255 characters."""
    base = PureWindowsPath(PurePosixPath(name).name).name
    cleaned = _UNPRINTABLE.sub("", base).strip()
    return cleaned[:NAME_LIMIT] or "attachment"


_SHA256 = re.compile(r"[0-9a-f]{64}")


class AttachmentStore:
    """Reads uploads (through `clawdbot.extraction`), stores them by SHA-256, and loads them back as Documents."""

    def __init__(self, db: Database, settings: Settings) -> None:
        self.db = db
        self.root = settings.data_dir / "attachments"
        self.limits = Limits(max_bytes=settings.max_upload_mb * MB)
        self._cache: OrderedDict[str, Extracted] = OrderedDict()
        self._cache_lock = threading.Lock()

    def read_all(self, uploads: Sequence[Upload]) -> AttachmentBatch:
        """Read every upload; stops at the first refusal, whose sentence names the file."""
        batch = AttachmentBatch()
        if len(uploads) > MAX_FILES:
            batch.refusal = f"at most {MAX_FILES} files can be attached to one message"
            batch.refused = [self._describe(u, batch.refusal) for u in uploads]
            return batch
        for upload in uploads:
            try:
                batch.read.append(self.read(upload))
            except ClawdbotError as exc:
                # Refused, or no reader free for 30 s: either way recorded, never an unaudited failure.
                batch.refusal = f"{display_name(upload.name)}: {exc.message}"
                batch.refused.append(self._describe(upload, exc.message))
                break
        return batch

    def read(self, upload: Upload) -> ReadAttachment:
        """Read one upload, or reuse what was read from the same bytes before; raises RejectedInputError."""
        name = display_name(upload.name)
        if upload.real_size > self.limits.max_bytes or not upload.complete:
            raise RejectedInputError(
                f"the file is {upload.real_size / MB:.1f} MB; the limit is {self.limits.max_bytes // MB} MB "
                "per file (CLAWDBOT_MAX_UPLOAD_MB)"
            )
        data = upload.data
        sha256 = hashlib.sha256(data).hexdigest()
        path = self._relative_path(sha256, detect_kind(name, data))
        extracted = self._load(path)
        if extracted is None:
            extracted = extract(name, data, self.limits)
            self._write(self.root / f"{sha256[:2]}/{sha256}", data)
            self._write(self.root / path, extracted.to_json().encode("utf-8"))
            self._remember(path, extracted)
        return ReadAttachment(name, sha256, len(data), extracted, path)

    def record(self, batch: AttachmentBatch, request_id: int, conversation_id: int | None) -> None:
        """Link the batch's files to the request (and conversation) that carried them: one row per file."""
        if not batch.read and not batch.refused:
            return
        if batch.refusal:
            # Nothing of a refused message was sent: its files must not join the conversation's documents.
            conversation_id = None
        with self.db.write() as session:
            for item in batch.read:
                described = item.record()
                session.add(
                    Attachment(
                        request_id=request_id,
                        conversation_id=conversation_id,
                        name=item.name,
                        media_type=MEDIA_TYPES[item.extracted.kind],
                        sha256=item.sha256,
                        size=item.size,
                        pages=described["pages"],
                        rows=described["rows"],
                        text_path=item.path,
                    )
                )
            for refused in batch.refused:
                session.add(
                    Attachment(
                        request_id=request_id,
                        conversation_id=conversation_id,
                        name=refused["name"],
                        media_type="",
                        sha256=refused["sha256"],
                        size=refused["size"],
                        text_path="",
                    )
                )

    def documents(self, conversation_id: int) -> list[Document]:
        """The conversation's readable attachments, oldest first, each file once (the caller checked the owner)."""
        with self.db.read() as session:
            rows = session.execute(
                select(Attachment.name, Attachment.sha256, Attachment.text_path)
                .where(Attachment.conversation_id == conversation_id, Attachment.text_path != "")
                .order_by(Attachment.id)
            ).all()
        documents: list[Document] = []
        seen: set[str] = set()
        for name, sha256, path in rows:
            if path in seen:
                continue
            seen.add(path)
            extracted = self._load(path)
            if extracted is not None:
                documents.append(extracted.document(name, sha256))
        return documents

    def for_turn(self, conversation_id: int | None, batch: AttachmentBatch) -> tuple[Document, ...]:
        """The documents a turn works with: the conversation's earlier attachments, then this message's, each
        file once."""
        earlier = self.documents(conversation_id) if conversation_id is not None else []
        unique: dict[tuple[str, str], Document] = {}
        for doc in (*earlier, *batch.documents):
            unique.setdefault((doc.sha256, doc.kind), doc)
        return tuple(unique.values())

    def names_by_request(self, conversation_id: int) -> dict[int, list[str]]:
        """The names of the files each request of the conversation carried, to show beside its message."""
        with self.db.read() as session:
            rows = session.execute(
                select(Attachment.request_id, Attachment.name)
                .where(Attachment.conversation_id == conversation_id, Attachment.request_id.is_not(None))
                .order_by(Attachment.id)
            ).all()
        names: dict[int, list[str]] = {}
        for request_id, name in rows:
            if request_id is not None:
                names.setdefault(request_id, []).append(name)
        return names

    def original(self, sha256: str) -> bytes | None:
        """The stored bytes of an attached file (for an auditor's download); None when they are not kept here."""
        if not _SHA256.fullmatch(sha256):
            return None
        try:
            return (self.root / sha256[:2] / sha256).read_bytes()
        except FileNotFoundError:
            return None

    @staticmethod
    def _relative_path(sha256: str, kind: str) -> str:
        # The kind is part of the name: the same bytes read as CSV or as text are different documents.
        return f"{sha256[:2]}/{sha256}.{kind}.json"

    def _load(self, path: str) -> Extracted | None:
        """The extracted content stored at `path` (checked to be one of ours), from memory when recent."""
        with self._cache_lock:
            cached = self._cache.get(path)
            if cached is not None:
                self._cache.move_to_end(path)
                return cached
        parts = path.split("/")
        if len(parts) != 2 or not _SHA256.fullmatch(parts[1].split(".")[0]):
            return None
        try:
            extracted = Extracted.from_json((self.root / path).read_text(encoding="utf-8"))
        except (OSError, ValueError, KeyError, TypeError):
            return None
        self._remember(path, extracted)
        return extracted

    def _remember(self, path: str, extracted: Extracted) -> None:
        with self._cache_lock:
            self._cache[path] = extracted
            self._cache.move_to_end(path)
            while len(self._cache) > _CACHED_DOCUMENTS:
                self._cache.popitem(last=False)

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        """Write whole or not at all (a temporary file renamed into place), readable by the owner only."""
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(temporary, path)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise

    @staticmethod
    def _describe(upload: Upload, reason: str) -> dict[str, Any]:
        return {
            "name": display_name(upload.name),
            # A file cut at the limit is not hashed: the hash of a part would name no file.
            "sha256": hashlib.sha256(upload.data).hexdigest() if upload.complete else "",
            "size": upload.real_size,
            "refused": reason,
        }


def describe(documents: Sequence[Document]) -> str:
    """One line naming the documents, e.g. for a notice: `report.pdf (PDF, 23 pages)`."""
    parts = []
    for doc in documents:
        if doc.kind in ("xlsx", "csv"):
            rows = sum(len(t.rows) for t in doc.tables)
            size = f"{rows:,} rows"
        else:
            size = f"{len(doc.pages):,} page{'s' if len(doc.pages) != 1 else ''}"
        parts.append(f"{doc.name} ({KIND_LABELS[doc.kind]}, {size})")
    return ", ".join(parts)
