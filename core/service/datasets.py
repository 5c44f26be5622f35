"""Text datasets uploaded for calibration, training and evaluation: JSONL with a `text` field (optional `label`, and
for evaluation `text_pair` + `score` for STS pairs) or multiple-choice rows (`question`, `choices`, `answer`; their
text is the question), or plain text with one sample per line. Validated while streaming, stored normalised as JSONL,
read back as a list of texts (or of rows, for evaluation)."""

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal

from core.errors import InvalidRequest, PayloadTooLarge, StorageFailed
from core.service.settings import Settings
from core.service.storage import ArtifactStore
from core.service.uploads import CHUNK, DISK_FULL

DatasetFormat = Literal["auto", "jsonl", "text"]
MAX_LINE_BYTES = 1 << 20
MAX_SAMPLES = 1_000_000
MAX_CHOICES = 64


@dataclass(frozen=True)
class StoredDataset:
    format: str
    num_samples: int
    size_bytes: int
    sha256: str
    storage_key: str


def dataset_storage_key(dataset_id: str) -> str:
    return f"datasets/{dataset_id}/data.jsonl"


def store_dataset_upload(source: BinaryIO, dataset_id: str, declared: DatasetFormat, filename: str | None,
                         settings: Settings, store: ArtifactStore) -> StoredDataset:
    """Validate every line of the upload (size-capped, hashed as it is read) and stream it, normalised to JSONL,
    into the store: no copy in scratch, one part in memory (S3). Nothing is stored on failure."""
    fmt = _detect_format(source, declared, filename)
    reader = _CappedReader(source, settings.max_dataset_bytes)
    key = dataset_storage_key(dataset_id)
    counted: list[int] = []
    with _disk_errors():
        store.put_stream(key, _normalised(reader, fmt, counted))
    return StoredDataset(fmt, counted[0], reader.size, reader.digest.hexdigest(), key)


class _CappedReader:
    """The upload's lines, hashed and counted as they are read; PayloadTooLarge past `max_bytes`."""

    def __init__(self, source: BinaryIO, max_bytes: int) -> None:
        self.source, self.max_bytes, self.size, self.digest = source, max_bytes, 0, hashlib.sha256()

    def __iter__(self) -> Iterator[bytes]:
        # at most one byte past MAX_LINE_BYTES per read: a body without newlines is refused by _parse_line, never
        # held in memory whole
        for raw in iter(lambda: self.source.readline(MAX_LINE_BYTES + 1), b""):
            self.size += len(raw)
            if self.size > self.max_bytes:
                raise PayloadTooLarge(f"the upload exceeds the limit of {self.max_bytes:,} bytes", {"field": "file"})
            self.digest.update(raw)
            yield raw


def _normalised(lines: _CappedReader, fmt: str, counted: list[int]) -> Iterator[bytes]:
    """The JSONL records of the lines, in batches of about CHUNK bytes; the count goes to `counted`."""
    count, batch = 0, bytearray()
    for number, raw in enumerate(lines, start=1):
        record = _parse_line(raw, number, fmt)
        if record is None:
            continue
        count += 1
        if count > MAX_SAMPLES:
            raise PayloadTooLarge(f"dataset has more than {MAX_SAMPLES:,} samples", {"field": "file"})
        batch += _record_bytes(record, number)
        if len(batch) >= CHUNK:
            yield bytes(batch)
            batch.clear()
    if lines.size == 0:
        raise InvalidRequest("the uploaded file is empty", {"field": "file"})
    if count == 0:
        raise InvalidRequest("the dataset has no samples (every line is empty)", {"field": "file"})
    counted.append(count)
    yield bytes(batch)


@contextmanager
def _disk_errors() -> Iterator[None]:
    """A full disk under the local store is the service's problem (507), not the client's."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in DISK_FULL:
            raise
        raise StorageFailed("the service is out of storage space for uploads; try again later") from exc


def read_texts(path: Path) -> list[str]:
    """The texts of a stored (normalised) dataset, in upload order."""
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def read_rows(path: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """The first `limit` rows (all when None) of a stored (normalised) dataset, each with its `text`."""
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if limit is not None and len(rows) >= limit:
                break
            rows.append(json.loads(line))
    return rows


def _detect_format(source: BinaryIO, declared: DatasetFormat, filename: str | None) -> str:
    """The declared format, else from the name, else from the first bytes (the source is rewound)."""
    if declared != "auto":
        return declared
    if filename and filename.lower().endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    head = source.read(4096).lstrip()
    source.seek(0)
    return "jsonl" if head.startswith(b"{") else "text"


def _record_bytes(record: dict[str, Any], number: int) -> bytes:
    try:
        return (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    except UnicodeEncodeError as exc:  # JSON's "\\ud800" escape decodes to a lone surrogate, which is not text
        raise InvalidRequest(f"line {number} holds a lone UTF-16 surrogate ({exc.object[exc.start:exc.end]!r}), "
                             "which is not a character", {"line": number}) from exc


def _parse_line(raw: bytes, number: int, fmt: str) -> dict[str, Any] | None:
    if len(raw) > MAX_LINE_BYTES:
        raise PayloadTooLarge(f"line {number} is longer than {MAX_LINE_BYTES:,} bytes", {"line": number})
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"line {number} is not valid UTF-8 ({exc.reason})", {"line": number}) from exc
    if not line:
        return None
    if fmt == "text":
        return {"text": line}
    return _json_record(line, number)


def _json_record(line: str, number: int) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, or an integer over 4,300 digits
        raise InvalidRequest(f"line {number} is not valid JSON: {exc}", {"line": number}) from exc
    if isinstance(value, dict) and "question" in value and "text" not in value:
        return _choice_record(value, number)
    if not isinstance(value, dict) or not isinstance(value.get("text"), str) or not value["text"].strip():
        raise InvalidRequest(f"line {number} must be a JSON object with a non-empty string field \"text\" (or a "
                             "multiple-choice row: \"question\", \"choices\", \"answer\")", {"line": number})
    record = {"text": value["text"]}
    if "label" in value:
        if not isinstance(value["label"], str | int):
            raise InvalidRequest(f"line {number}: \"label\" must be a string or an integer", {"line": number})
        record["label"] = value["label"]
    if "text_pair" in value or "score" in value:
        record.update(_pair_fields(value, number))
    return record


def _pair_fields(value: dict[str, Any], number: int) -> dict[str, Any]:
    """An STS pair: the second text and a numeric similarity score (any scale; only its rank is used)."""
    pair, score = value.get("text_pair"), value.get("score")
    if not isinstance(pair, str) or not pair.strip() or isinstance(score, bool) or not isinstance(score, int | float):
        raise InvalidRequest(f"line {number}: an STS pair needs a non-empty string \"text_pair\" and a numeric "
                             "\"score\"", {"line": number})
    return {"text_pair": pair, "score": score}


def _choice_record(value: dict[str, Any], number: int) -> dict[str, Any]:
    """A multiple-choice row: `answer` is the index of the right choice or the choice itself."""
    question, choices, answer = value.get("question"), value.get("choices"), value.get("answer")
    if (not isinstance(question, str) or not question.strip() or not isinstance(choices, list)
            or not 2 <= len(choices) <= MAX_CHOICES
            or not all(isinstance(choice, str) and choice.strip() for choice in choices)):
        raise InvalidRequest(f"line {number}: a multiple-choice row needs a non-empty string \"question\" and "
                             f"\"choices\", a list of 2 to {MAX_CHOICES} non-empty strings", {"line": number})
    if isinstance(answer, str) and answer in choices:
        answer = choices.index(answer)
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise InvalidRequest(f"line {number}: \"answer\" must be the index of a choice (0 to {len(choices) - 1}) "
                             "or one of the choices", {"line": number})
    return {"text": question, "question": question, "choices": choices, "answer": answer}
