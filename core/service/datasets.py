"""Text datasets uploaded for calibration, training and evaluation: JSONL with a `text` field (optional `label`, and
for evaluation `text_pair` + `score` for STS pairs) or multiple-choice rows (`question`, `choices`, `answer`; their
text is the question), or plain text with one sample per line. Validated while streaming, stored normalised as JSONL,
read back as a list of texts (or of rows, for evaluation)."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Literal, TextIO

from core.errors import InvalidRequest, PayloadTooLarge
from core.service.settings import Settings
from core.service.storage import ArtifactStore
from core.service.uploads import scratch_dir, spool_upload

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
    """Spool the upload (size-capped, hashed), validate every line, store it as JSONL. Nothing is left on failure."""
    with scratch_dir(settings, "dataset") as scratch:
        sha256, size = spool_upload(source, scratch / "upload", settings.max_dataset_bytes)
        fmt = _detect_format(scratch / "upload", declared, filename)
        count = _normalise(scratch / "upload", scratch / "data.jsonl", fmt)
        key = dataset_storage_key(dataset_id)
        store.put_file(key, scratch / "data.jsonl")
        return StoredDataset(fmt, count, size, sha256, key)


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


def _detect_format(path: Path, declared: DatasetFormat, filename: str | None) -> str:
    if declared != "auto":
        return declared
    if filename and filename.lower().endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    with path.open("rb") as handle:
        head = handle.read(4096).lstrip()
    return "jsonl" if head.startswith(b"{") else "text"


def _normalise(source: Path, target: Path, fmt: str) -> int:
    count = 0
    with source.open("rb") as lines, target.open("w", encoding="utf-8") as out:
        for number, raw in enumerate(lines, start=1):
            record = _parse_line(raw, number, fmt)
            if record is None:
                continue
            count += 1
            if count > MAX_SAMPLES:
                raise PayloadTooLarge(f"dataset has more than {MAX_SAMPLES:,} samples", {"field": "file"})
            _write_record(out, record, number)
    if count == 0:
        raise InvalidRequest("the dataset has no samples (every line is empty)", {"field": "file"})
    return count


def _write_record(out: TextIO, record: dict[str, Any], number: int) -> None:
    try:
        out.write(json.dumps(record, ensure_ascii=False) + "\n")
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
