"""Safe extraction of uploaded archives (.zip, .tar.gz): only regular files and folders with plain relative names,
under caps on member count, total size and compression ratio. Sizes are counted while writing, so an archive that
lies about its sizes is stopped at the cap, and a failed extraction leaves nothing behind."""

import shutil
import stat
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from core.errors import InvalidRequest, PayloadTooLarge, UnsafeInput

CHUNK = 1 << 20


@dataclass(frozen=True)
class ExtractionLimits:
    max_members: int
    max_total_bytes: int
    max_ratio: float


# What `load_compressed` allows when it extracts an artifact zip by itself (the service's own limits for uploads are
# MCS_MAX_ARCHIVE_MEMBERS, MCS_MAX_EXTRACTED_BYTES and MCS_MAX_COMPRESSION_RATIO, with the same defaults).
ARTIFACT_LIMITS = ExtractionLimits(max_members=1000, max_total_bytes=4 * 1024**3, max_ratio=200.0)


def extract_archive(archive: Path, dest: Path, limits: ExtractionLimits) -> Path:
    """Extract `archive` into the new folder `dest` and return the model root inside it (the folder holding
    config.json: `dest` itself, or its single top-level folder)."""
    dest.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            _extract_zip(archive, dest, limits)
        elif _is_tar(archive):
            _extract_tar(archive, dest, limits)
        else:
            raise InvalidRequest("the upload is not a .zip or .tar.gz archive", {"field": "file"})
    except tarfile.FilterError as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise UnsafeInput(f"unsafe archive member: {exc}") from exc
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as exc:
        shutil.rmtree(dest, ignore_errors=True)
        raise InvalidRequest(f"the archive is corrupt: {exc}", {"field": "file"}) from exc
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return model_root(dest)


def model_root(folder: Path) -> Path:
    entries = [p for p in folder.iterdir() if not p.name.startswith("__MACOSX")]
    if len(entries) == 1 and entries[0].is_dir() and not (folder / "config.json").exists():
        return entries[0]
    return folder


def safe_member_name(name: str) -> PurePosixPath:
    """Reject absolute paths, drive letters, backslashes, `..`, NUL and empty names."""
    if not name or "\x00" in name or "\\" in name or (len(name) > 1 and name[1] == ":"):
        raise UnsafeInput(f"archive member {name!r} has an unsafe name")
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts:
        raise UnsafeInput(f"archive member {name!r} points outside the archive")
    return path


class _Budget:
    def __init__(self, limits: ExtractionLimits, archive_bytes: int) -> None:
        self.limits = limits
        self.members = 0
        self.total = 0
        self.max_total = min(limits.max_total_bytes, int(max(archive_bytes, CHUNK) * limits.max_ratio))
        self.folded: dict[str, str] = {}

    def member(self, name: str) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise PayloadTooLarge(f"archive has more than {self.limits.max_members} members")

    def file_name(self, name: PurePosixPath) -> None:
        """Names equal but for case would overwrite each other on a case-insensitive filesystem."""
        folded = str(name).casefold()
        if folded in self.folded:
            first = self.folded[folded]
            problem = "appears twice" if first == str(name) else f"differs only by case from {first!r}"
            raise UnsafeInput(f"archive member {str(name)!r} {problem}")
        self.folded[folded] = str(name)

    def bytes(self, count: int) -> None:
        self.total += count
        if self.total > self.max_total:
            raise PayloadTooLarge(
                f"archive expands to more than {self.max_total:,} bytes (limit: {self.limits.max_total_bytes:,} "
                f"bytes and {self.limits.max_ratio:g}x the archive size)"
            )


def _write_member(source: IO[bytes], dest: Path, name: PurePosixPath, budget: _Budget) -> None:
    budget.file_name(name)
    target = dest / name
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        raise UnsafeInput(f"archive member {str(name)!r} appears twice")
    with target.open("xb") as out:
        for chunk in iter(lambda: source.read(CHUNK), b""):
            budget.bytes(len(chunk))
            out.write(chunk)


def _extract_zip(archive: Path, dest: Path, limits: ExtractionLimits) -> None:
    budget = _Budget(limits, archive.stat().st_size)
    declared = _zip_entry_count(archive)
    if declared > limits.max_members:  # checked before zipfile parses (and holds in memory) the whole directory
        raise PayloadTooLarge(f"archive has more than {limits.max_members} members ({declared:,} declared)")
    with zipfile.ZipFile(archive) as zf:
        _check_no_overlap(zf.infolist())
        for info in zf.infolist():
            budget.member(info.filename)
            name = safe_member_name(info.filename)
            file_type = stat.S_IFMT(info.external_attr >> 16)  # 0 when the zip records no Unix mode
            if file_type and file_type not in (stat.S_IFREG, stat.S_IFDIR):
                raise UnsafeInput(f"archive member {info.filename!r} is not a regular file or folder")
            if info.is_dir():
                (dest / name).mkdir(parents=True, exist_ok=True)
                continue
            with zf.open(info) as source:
                _write_member(source, dest, name, budget)


def _zip_entry_count(archive: Path) -> int:
    """The member count the end-of-central-directory record declares (zip64 included); 0 if there is none, in
    which case zipfile itself reports the archive as corrupt."""
    with archive.open("rb") as handle:
        handle.seek(max(archive.stat().st_size - (1 << 16) - 22, 0))
        tail = handle.read()
        end = tail.rfind(b"PK\x05\x06")
        if end < 0 or end + 12 > len(tail):
            return 0
        count = struct.unpack_from("<H", tail, end + 10)[0]
        locator = tail.rfind(b"PK\x06\x07", 0, end)
        if count == 0xFFFF and locator >= 0 and locator + 16 <= len(tail):
            handle.seek(struct.unpack_from("<Q", tail, locator + 8)[0])
            record = handle.read(40)
            count = struct.unpack_from("<Q", record, 32)[0] if len(record) == 40 else 0
    return count


def _check_no_overlap(infos: list[zipfile.ZipInfo]) -> None:
    """Members whose compressed data run into the next member are the overlapping-entry bomb: many names
    inflating the same kernel. Honest archives store every member's bytes once."""
    ordered = sorted(infos, key=lambda info: info.header_offset)
    for info, following in zip(ordered, ordered[1:], strict=False):
        if info.header_offset + info.compress_size > following.header_offset:
            raise UnsafeInput(f"archive members {info.filename!r} and {following.filename!r} overlap")


def _is_tar(archive: Path) -> bool:
    try:
        return tarfile.is_tarfile(archive)
    except OSError:
        return False


def _extract_tar(archive: Path, dest: Path, limits: ExtractionLimits) -> None:
    budget = _Budget(limits, archive.stat().st_size)
    with tarfile.open(archive, mode="r:*") as tf:
        for member in _tar_members(tf, budget):
            # tarfile's "data" filter re-checks what we checked (links, devices, modes, paths) as a second guard.
            member = tarfile.data_filter(member, str(dest))
            if member.isdir():
                (dest / member.name).mkdir(parents=True, exist_ok=True)
                continue
            source = tf.extractfile(member)
            if source is None:
                raise UnsafeInput(f"archive member {member.name!r} has no data")
            with source:
                _write_member(source, dest, PurePosixPath(member.name), budget)


def _tar_members(tf: tarfile.TarFile, budget: _Budget) -> Iterator[tarfile.TarInfo]:
    for member in tf:
        budget.member(member.name)
        safe_member_name(member.name)
        if not (member.isfile() or member.isdir()):
            raise UnsafeInput(f"archive member {member.name!r} is a link or special file; only files are allowed")
        if member.mode & (stat.S_ISUID | stat.S_ISGID):
            raise UnsafeInput(f"archive member {member.name!r} has setuid/setgid bits")
        yield member
