"""Parallel hashing of a checkpoint's files gives exactly hashlib's digest of each file."""

import hashlib
import os

from pipeline.checkpoint.writer import sha256_files


def test_sha256_files_matches_hashlib_per_file(tmp_path):
    paths = []
    for k, size in enumerate([0, 1, 5 << 20, (9 << 20) + 3, 4097]):  # empty, tiny, over the 4 MiB read size
        p = tmp_path / f"f{k}.bin"
        p.write_bytes(os.urandom(size))
        paths.append(p)
    got = sha256_files(paths)
    assert set(got) == set(paths)
    for p in paths:
        assert got[p] == hashlib.sha256(p.read_bytes()).hexdigest(), p.name
    assert sha256_files([paths[2]]) == {paths[2]: got[paths[2]]}
