"""File fingerprints: remembered within a run, yet never stale for a rewritten file."""
from src.io import atomic_path, file_fingerprint


def test_fingerprint_follows_content_across_atomic_rewrites(tmp_path):
    path, twin = tmp_path / "weights.bin", tmp_path / "copy.bin"
    path.write_bytes(b"a" * 4096)
    twin.write_bytes(b"a" * 4096)
    first = file_fingerprint(path)
    assert file_fingerprint(path) == first == file_fingerprint(twin)  # same bytes, same id
    for content in (b"b" * 4096, b"a" * 4096, b"c" * 4096):  # same size each time, rewritten at once
        with atomic_path(path) as tmp:
            tmp.write_bytes(content)
        assert (file_fingerprint(path) == first) == (content == b"a" * 4096)
