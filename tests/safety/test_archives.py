"""Archives built to escape the extraction folder or expand without bound (see core/compression/archive.py)."""

import io
import stat
import struct
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import pytest

from core.compression.archive import ExtractionLimits, extract_archive
from core.errors import InvalidRequest, PayloadTooLarge, UnsafeInput
from tests.fixtures.api import leftovers

pytestmark = pytest.mark.safety
LIMITS = ExtractionLimits(max_members=1000, max_total_bytes=10_000_000, max_ratio=100)


def tar_of(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, mode
    return info


def refuse(archive: Path, tmp_path: Path, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        extract_archive(archive, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name", ["../../x", "/abs", "C:\\x", "C:x", "ok/../../x"])
def test_escaping_names_in_tar(tmp_path, name):
    refuse(tar_of(tmp_path / "a.tgz", [(member(name), b"1")]), tmp_path, UnsafeInput, "archive member")


@pytest.mark.parametrize("make", ["zip", "tar"])
def test_names_differing_only_by_case(tmp_path, make):
    if make == "zip":
        archive = tmp_path / "a.zip"
        with zipfile.ZipFile(archive, "w") as zf:
            zf.writestr("model/Config.json", b"{}")
            zf.writestr("model/config.json", b"{}")
    else:
        archive = tar_of(tmp_path / "a.tgz", [(member("Config.json"), b"{}"), (member("config.json"), b"{}")])
    refuse(archive, tmp_path, UnsafeInput, "differs only by case")


def test_symlink_to_parent_then_a_file_through_it(tmp_path):
    archive = tar_of(tmp_path / "a.tgz", [(member("d", tarfile.SYMTYPE, "../../"), None), (member("d/file"), b"x")])
    refuse(archive, tmp_path, UnsafeInput, "'d' is a link")
    assert not (tmp_path.parent / "file").exists()


def test_symlink_in_zip(tmp_path):
    archive = tmp_path / "a.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        info = zipfile.ZipInfo("d")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "../../")
        zf.writestr("d/file", b"x")
    refuse(archive, tmp_path, UnsafeInput, "not a regular file")


@pytest.mark.parametrize(("kind", "linkname"), [(tarfile.LNKTYPE, "/etc/passwd"), (tarfile.CHRTYPE, ""),
                                                (tarfile.BLKTYPE, ""), (tarfile.FIFOTYPE, "")])
def test_hardlinks_devices_and_fifos(tmp_path, kind, linkname):
    refuse(tar_of(tmp_path / "a.tgz", [(member("x", kind, linkname), None)]), tmp_path, UnsafeInput,
           "link or special file")


@pytest.mark.parametrize("mode", [0o4755, 0o2755])
def test_setuid_and_setgid(tmp_path, mode):
    refuse(tar_of(tmp_path / "a.tgz", [(member("run", mode=mode), b"#!")]), tmp_path, UnsafeInput, "setuid")


def overlapping_zip_bomb(path: Path, copies: int, kernel_bytes: int) -> Path:
    """Fifield's construction, simplified: every central-directory entry points at the same local header,
    so one compressed kernel is inflated once per entry."""
    data = zlib.compressobj(9, zlib.DEFLATED, -15)
    kernel = data.compress(b"\0" * kernel_bytes) + data.flush()
    crc = zlib.crc32(b"\0" * kernel_bytes)
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, 0, crc, len(kernel), kernel_bytes, 1, 0) + b"a"
    central = b"".join(
        struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, 0, crc, len(kernel), kernel_bytes,
                    len(name), 0, 0, 0, 0, 0, 0) + name
        for name in (f"f{i}".encode() for i in range(copies))
    )
    body = local + kernel
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, copies, copies, len(central), len(body), 0)
    path.write_bytes(body + central + end)
    return path


def test_overlapping_entry_zip_bomb(tmp_path):
    refuse(overlapping_zip_bomb(tmp_path / "o.zip", 50, 1_000_000), tmp_path, UnsafeInput, "overlap")


def test_high_ratio_bomb_is_stopped_while_writing(tmp_path):
    archive = tmp_path / "r.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros", b"\0" * 50_000_000)
    refuse(archive, tmp_path, PayloadTooLarge, "expands to more than")


def test_nested_bomb_is_not_expanded(tmp_path):
    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros", b"\0" * 20_000_000)
    outer = tmp_path / "n.zip"
    with zipfile.ZipFile(outer, "w", zipfile.ZIP_DEFLATED) as zf:
        for i in range(5):
            zf.writestr(f"inner{i}.zip", inner.getvalue())
    root = extract_archive(outer, tmp_path / "out", LIMITS)
    assert sum(f.stat().st_size for f in root.iterdir()) == 5 * len(inner.getvalue()) < 200_000


def many_empty_members_zip(path: Path, count: int) -> Path:
    """A valid zip of `count` empty stored members, written directly (zipfile needs ~30 s for 10^6)."""
    local, central, offset = [], [], 0
    for i in range(count):
        name = str(i).encode()
        local.append(struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 0, 0, 0, 0, 0, 0, len(name), 0) + name)
        central.append(struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 0, 0, 0, 0, 0, 0, len(name),
                                   0, 0, 0, 0, 0, offset) + name)
        offset += 30 + len(name)
    directory = b"".join(central)
    zip64_end = struct.pack("<IQHHIIQQQQ", 0x06064B50, 44, 45, 45, 0, 0, count, count, len(directory), offset)
    locator = struct.pack("<IIQI", 0x07064B50, 0, offset + len(directory), 1)
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 0xFFFF, 0xFFFF, len(directory), offset, 0)
    path.write_bytes(b"".join(local) + directory + zip64_end + locator + end)
    return path


def test_a_million_tiny_members_is_refused_before_reading_the_directory(tmp_path):
    archive = many_empty_members_zip(tmp_path / "many.zip", 1_000_000)
    assert len(zipfile.ZipFile(many_empty_members_zip(tmp_path / "few.zip", 3)).infolist()) == 3  # valid layout
    started = time.monotonic()
    refuse(archive, tmp_path, PayloadTooLarge, r"more than 1000 members \(1,000,000 declared\)")
    assert time.monotonic() - started < 1


def test_tiny_members_in_a_tar_stop_at_the_cap(tmp_path):
    archive = tar_of(tmp_path / "many.tgz", [(member(f"f{i}"), b"") for i in range(1_001)])
    refuse(archive, tmp_path, PayloadTooLarge, "more than 1000 members")


def test_truncated_and_random_archives(tmp_path):
    good = tmp_path / "g.zip"
    with zipfile.ZipFile(good, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("config.json", b"{}" * 1000)
    (tmp_path / "cut.zip").write_bytes(good.read_bytes()[:-30])
    (tmp_path / "rand.zip").write_bytes(bytes(range(256)) * 100)
    for name in ("cut.zip", "rand.zip"):
        with pytest.raises(InvalidRequest):
            extract_archive(tmp_path / name, tmp_path / f"out-{name}", LIMITS)
        assert not (tmp_path / f"out-{name}").exists()


def test_an_unsafe_archive_upload_leaves_nothing(client, auth, bert_folder, tmp_path):
    archive = tar_of(tmp_path / "a.tgz", [(member("config.json"), (bert_folder / "config.json").read_bytes()),
                                          (member("d", tarfile.SYMTYPE, "../../"), None)])
    response = client.post("/v1/models", files={"file": ("a.tgz", archive.read_bytes(), "application/gzip")},
                           headers=auth)
    assert response.status_code == 400 and "'d' is a link" in response.json()["error"]["message"]
    assert leftovers() == []
