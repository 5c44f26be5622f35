"""Validate an uploaded `.safetensors` file ourselves, before any library parses it.

The format is an 8-byte little-endian header length, a JSON header (UTF-8) mapping tensor names to
`{"dtype", "shape", "data_offsets"}` plus an optional `__metadata__` of strings, then the data buffer. We check
every claim the header makes against the file: the header's size and encoding, duplicate keys (the JSON parser
of safetensors 0.8 keeps the last one silently), known dtypes, shapes whose element count matches the byte range,
byte ranges that tile the buffer exactly (no gap, overlap, or trailing bytes), and finally the values themselves:
a float tensor holding NaN or Inf is refused, because compressing it can only produce garbage.
"""

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np

from core.errors import UnsafeInput

MAX_HEADER_BYTES = 16 * 1024**2  # a 1,000-tensor shard needs ~100 KB; the cap bounds memory and parse time
MAX_RANK = 16
MAX_TENSORS = 100_000
CHUNK_ELEMENTS = 1 << 22
ITEM_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8,
}
# Float dtypes read as unsigned integers: a value is NaN or Inf exactly when all its exponent bits are set
# (for F8_E4M3, the "fn" variant without Inf, when all bits but the sign are set).
NON_FINITE_MASKS = {
    "F16": (np.uint16, 0x7C00), "BF16": (np.uint16, 0x7F80), "F32": (np.uint32, 0x7F800000),
    "F64": (np.uint64, 0x7FF0000000000000), "F8_E5M2": (np.uint8, 0x7C), "F8_E4M3": (np.uint8, 0x7F),
}
FLOAT_DTYPES = frozenset(NON_FINITE_MASKS)


def check_safetensors(path: Path) -> dict[str, dict[str, Any]]:
    """Validate `path` (header, layout and values) and return its tensor entries; raise `UnsafeInput` naming
    the file and the problem otherwise."""
    try:
        header, data_start = _read_header(path)
        tensors = _tensor_entries(header)
        _check_layout(tensors, path.stat().st_size - data_start)
        _check_finite(path, tensors, data_start)
    except UnsafeInput as exc:
        raise UnsafeInput(f"{path.name}: {exc.message}", {"file": path.name}) from exc
    return tensors


def _read_header(path: Path) -> tuple[dict[str, Any], int]:
    size = path.stat().st_size
    with path.open("rb") as handle:
        length = header_length(handle.read(8), size)
        raw = handle.read(length)
    return parse_header(raw), 8 + length


def header_length(prefix: bytes, size: int) -> int:
    """The header's length from a file's first 8 bytes (`size`: the whole file's)."""
    if len(prefix) < 8:
        raise UnsafeInput("not a safetensors file (shorter than its 8-byte header length)")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length < 2 or length > MAX_HEADER_BYTES or 8 + length > size:
        raise UnsafeInput(f"header length {length:,} is invalid (file: {size:,} bytes, "
                          f"limit: {MAX_HEADER_BYTES:,})")
    return int(length)


def parse_header(raw: bytes) -> dict[str, Any]:
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys)
    except UnicodeDecodeError as exc:
        raise UnsafeInput(f"header is not valid UTF-8 ({exc.reason})") from exc
    except (ValueError, RecursionError) as exc:  # ValueError: bad JSON, or an integer over 4,300 digits
        raise UnsafeInput(f"header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise UnsafeInput("header must be a JSON object")
    return header


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise UnsafeInput(f"header names {key!r} twice")
        if not _is_unicode(key) or (isinstance(value, str) and not _is_unicode(value)):
            raise UnsafeInput(f"header entry {key!r} holds a lone UTF-16 surrogate, which safetensors cannot read")
        result[key] = value
    return result


def _is_unicode(text: str) -> bool:
    """False for a string holding a lone surrogate: JSON's `\\ud800` escape makes one, UTF-8 cannot encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _tensor_entries(header: dict[str, Any]) -> dict[str, dict[str, Any]]:
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UnsafeInput("__metadata__ must map strings to strings")
    if len(header) > MAX_TENSORS:
        raise UnsafeInput(f"header lists {len(header):,} tensors; the limit is {MAX_TENSORS:,}")
    for name, entry in header.items():
        _check_entry(name, entry)
    return header


def _check_entry(name: str, entry: Any) -> None:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise UnsafeInput(f"tensor {name!r}: an entry needs exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in ITEM_BYTES:
        raise UnsafeInput(f"tensor {name!r}: unknown dtype {dtype!r}")
    if not _int_list(shape, MAX_RANK) or not _int_list(offsets, 2) or len(offsets) != 2:
        raise UnsafeInput(f"tensor {name!r}: shape and data_offsets must be lists of non-negative integers")
    begin, end = offsets
    numel = 1
    for dim in shape:
        numel *= dim  # Python integers: [2**62, 2**62] cannot overflow into a small number
    if begin > end or numel * ITEM_BYTES[dtype] != end - begin:
        raise UnsafeInput(f"tensor {name!r}: shape {shape} of {dtype} needs {numel * ITEM_BYTES[dtype]:,} bytes "
                          f"but data_offsets {offsets} hold {end - begin:,}")


def _int_list(value: Any, max_length: int) -> bool:
    return (isinstance(value, list) and len(value) <= max_length
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))


def _check_layout(tensors: dict[str, dict[str, Any]], data_bytes: int) -> None:
    """The byte ranges, sorted, must start at 0, follow each other without gap or overlap and end at the file's
    end: every byte belongs to exactly one tensor."""
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, end = entry["data_offsets"]
        if begin != position:
            problem = "overlaps the previous tensor" if begin < position else f"leaves a gap at byte {position:,}"
            raise UnsafeInput(f"tensor {name!r}: data_offsets {entry['data_offsets']} {problem}")
        position = end
    if position != data_bytes:
        where = "past the end of" if position > data_bytes else "short of"
        raise UnsafeInput(f"tensor data ends {where} the file ({position:,} of {data_bytes:,} data bytes)")


def _check_finite(path: Path, tensors: dict[str, dict[str, Any]], data_start: int) -> None:
    for name, entry in tensors.items():
        if entry["dtype"] not in NON_FINITE_MASKS or entry["data_offsets"][0] == entry["data_offsets"][1]:
            continue
        dtype, mask = NON_FINITE_MASKS[entry["dtype"]]
        count = (entry["data_offsets"][1] - entry["data_offsets"][0]) // np.dtype(dtype).itemsize
        values = np.memmap(path, dtype=dtype, mode="r", offset=data_start + entry["data_offsets"][0], shape=(count,))
        bad = sum(int(np.count_nonzero((values[i:i + CHUNK_ELEMENTS] & mask) == mask))
                  for i in range(0, count, CHUNK_ELEMENTS))
        del values
        if bad:
            raise UnsafeInput(f"tensor {name!r} holds {bad:,} NaN or Inf values of {count:,}; refusing to "
                              "compress non-finite weights")



class StreamCheck:
    """`check_safetensors` over a file's bytes as they arrive in order (an upload in flight), so that the values
    need not be read again once stored: the header and layout as soon as the header is in, each float tensor's
    values as they pass. It never raises: the first problem is kept in `problem`, and `header` (the file's first
    8 + header-length bytes) is set only once all `size` bytes passed every check.

    Example: `check = StreamCheck(size)`, `check.update(piece)` for each piece in order, then `check.header`."""

    def __init__(self, size: int) -> None:
        self.size, self.seen = size, 0
        self.head = bytearray()  # the header while it arrives
        self.data_start = 0
        self.ranges: list[tuple[int, int, Any, int]] = []  # float tensors: absolute begin, end, dtype, mask
        self.next = 0  # the first entry of `ranges` not yet checked to its end
        self.carry = b""  # the start of a value split between two pieces
        self.problem: str | None = None
        self.header: bytes | None = None

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self.problem is not None:
            return
        try:
            self._update(memoryview(data).cast("B"))
        except UnsafeInput as exc:
            self.problem = exc.message

    def _update(self, view: memoryview) -> None:
        start, self.seen = self.seen, self.seen + len(view)
        if self.seen > self.size:
            raise UnsafeInput(f"more than the declared {self.size:,} bytes")
        view, start = self._take_header(view, start)
        if view:
            self._check_values(view, start)
        if self.seen == self.size:
            if not self.data_start:
                raise UnsafeInput("the file ends inside its header")
            self.header = bytes(self.head)

    def _take_header(self, view: memoryview, start: int) -> tuple[memoryview, int]:
        """Collect the header; once complete, check it and the layout. Returns what follows it in `view`."""
        while view and not self.data_start:
            wanted = 8 if len(self.head) < 8 else 8 + header_length(bytes(self.head[:8]), self.size)
            taken = min(wanted - len(self.head), len(view))
            self.head += view[:taken]
            view, start = view[taken:], start + taken
            if len(self.head) == wanted > 8:
                self._read_layout()
        return view, start

    def _read_layout(self) -> None:
        tensors = _tensor_entries(parse_header(bytes(self.head[8:])))
        self.data_start = len(self.head)
        _check_layout(tensors, self.size - self.data_start)
        floats = [entry for entry in tensors.values()
                  if entry["dtype"] in NON_FINITE_MASKS and entry["data_offsets"][0] < entry["data_offsets"][1]]
        self.ranges = sorted((self.data_start + entry["data_offsets"][0], self.data_start + entry["data_offsets"][1],
                              *NON_FINITE_MASKS[entry["dtype"]]) for entry in floats)

    def _check_values(self, view: memoryview, start: int) -> None:
        """The float values in `view` (bytes `start`... of the file); a value split at its end waits in `carry`."""
        end = start + len(view)
        while self.next < len(self.ranges) and self.ranges[self.next][0] < end:
            begin, stop, dtype, mask = self.ranges[self.next]
            lo, hi = max(begin, start), min(stop, end)
            piece = self.carry + view[lo - start:hi - start] if self.carry else view[lo - start:hi - start]
            itemsize = np.dtype(dtype).itemsize
            count = len(piece) // itemsize
            if np.count_nonzero((np.frombuffer(piece, dtype=dtype, count=count) & mask) == mask):
                raise UnsafeInput(f"the tensor at bytes {begin:,}-{stop:,} holds NaN or Inf values; refusing to "
                                  "compress non-finite weights")
            self.carry = bytes(piece[count * itemsize:])
            if hi < stop:
                return
            self.next += 1
