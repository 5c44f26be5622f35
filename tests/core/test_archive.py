import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from core.compression.archive import ExtractionLimits, extract_archive
from core.errors import InvalidRequest, PayloadTooLarge, UnsafeInput

LIMITS = ExtractionLimits(max_members=10, max_total_bytes=1_000_000, max_ratio=50)


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def make_tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info in members:
            payload = (data or {}).get(info.name)
            tf.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return path


def test_zip_with_single_top_folder_returns_that_folder(tmp_path):
    archive = make_zip(tmp_path / "a.zip", {"m/config.json": b"{}", "m/w.safetensors": b"x"})
    root = extract_archive(archive, tmp_path / "out", LIMITS)
    assert root == tmp_path / "out" / "m"
    assert (root / "config.json").read_bytes() == b"{}"


@pytest.mark.parametrize("name", ["../../x", "/abs/x", "C:\\x", "a/../../x", "dir\\..\\x"])
def test_unsafe_names_are_refused_and_nothing_is_left(tmp_path, name):
    archive = make_zip(tmp_path / "a.zip", {"ok.txt": b"1", name: b"2"})
    with pytest.raises(UnsafeInput, match="archive member"):
        extract_archive(archive, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()


def test_high_ratio_bomb_stops_at_the_cap(tmp_path):
    archive = make_zip(tmp_path / "bomb.zip", {"zeros": b"\0" * 5_000_000})
    assert archive.stat().st_size < 10_000
    with pytest.raises(PayloadTooLarge, match="expands to more than"):
        extract_archive(archive, tmp_path / "out", LIMITS)
    assert not (tmp_path / "out").exists()


def test_member_count_is_capped(tmp_path):
    archive = make_zip(tmp_path / "many.zip", {f"f{i}": b"" for i in range(11)})
    with pytest.raises(PayloadTooLarge, match="more than 10 members"):
        extract_archive(archive, tmp_path / "out", LIMITS)


@pytest.mark.parametrize("kind", [tarfile.SYMTYPE, tarfile.LNKTYPE, tarfile.CHRTYPE, tarfile.FIFOTYPE])
def test_links_and_special_files_in_tar_are_refused(tmp_path, kind):
    info = tarfile.TarInfo("evil")
    info.type, info.linkname = kind, "/etc/passwd"
    archive = make_tar(tmp_path / "a.tar.gz", [info])
    with pytest.raises(UnsafeInput, match="link or special file"):
        extract_archive(archive, tmp_path / "out", LIMITS)


def test_setuid_member_is_refused(tmp_path):
    info = tarfile.TarInfo("run.sh")
    info.size, info.mode = 2, 0o4755
    archive = make_tar(tmp_path / "a.tar.gz", [info], {"run.sh": b"hi"})
    with pytest.raises(UnsafeInput, match="setuid"):
        extract_archive(archive, tmp_path / "out", LIMITS)


def test_duplicate_member_is_refused(tmp_path):
    path = tmp_path / "dup.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", b"{}")
        with pytest.warns(UserWarning):
            zf.writestr("config.json", b"{\"x\": 1}")
    with pytest.raises(UnsafeInput, match="appears twice"):
        extract_archive(path, tmp_path / "out", LIMITS)


def test_random_bytes_and_corrupt_gzip_are_invalid(tmp_path):
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(InvalidRequest, match="not a .zip or .tar.gz"):
        extract_archive(junk, tmp_path / "out", LIMITS)
    good = make_tar(tmp_path / "t.tar.gz", [tarfile.TarInfo("a")], {"a": b""})
    truncated = tmp_path / "cut.tar.gz"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.raises((InvalidRequest, UnsafeInput)):
        extract_archive(truncated, tmp_path / "out2", LIMITS)
