"""The test suite's own machinery (tests/conftest.py): the bound on its compilation cache."""

import os

from tests.conftest import prune_least_recently_used


def test_pruning_deletes_the_least_recently_used_files_until_the_folder_fits(tmp_path):
    for age, name in enumerate(["newest", "middle", "oldest"]):
        path = tmp_path / name
        path.write_bytes(b"x" * 100)
        os.utime(path, (1_000_000 - age, 1_000_000 - age))  # (atime, mtime): "oldest" used longest ago
    prune_least_recently_used(str(tmp_path), max_bytes=250)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["middle", "newest"]
    prune_least_recently_used(str(tmp_path), max_bytes=200)  # already fits
    assert len(list(tmp_path.iterdir())) == 2
    os.utime(tmp_path / "middle", (2_000_000, 1_000_000))  # read since: used more recently than "newest"
    prune_least_recently_used(str(tmp_path), max_bytes=100)
    assert [p.name for p in tmp_path.iterdir()] == ["middle"]
    prune_least_recently_used(str(tmp_path / "absent"), max_bytes=0)  # no cache yet: nothing to do
