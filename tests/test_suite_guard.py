"""The suite's own guard against tests that write outside their folders (support/outside.py)."""

import os

from support.outside import changes, snapshot


def test_the_guard_sees_a_new_a_changed_and_a_removed_file(tmp_path) -> None:
    (tmp_path / "etc" / "nginx").mkdir(parents=True)
    kept = tmp_path / "etc" / "nginx" / "nginx.conf"
    kept.write_text("events {}\n")
    gone = tmp_path / "etc" / "old"
    gone.write_text("x")
    roots = (str(tmp_path / "etc"), str(tmp_path / "missing"))
    before = snapshot(roots)
    assert changes(before, snapshot(roots)) == []

    (tmp_path / "etc" / "nginx" / "sites-enabled").mkdir()
    kept.write_text("events {}\nhttp {}\n")
    gone.unlink()
    found = changes(before, snapshot(roots))
    assert f"new: {tmp_path}/etc/nginx/sites-enabled" in found
    assert f"changed: {kept}" in found
    assert f"removed: {gone}" in found
    # The folder that holds the new entry changed as well (its mtime).
    assert f"changed: {tmp_path}/etc/nginx" in found


def test_the_guard_does_not_follow_links(tmp_path) -> None:
    (tmp_path / "etc").mkdir()
    os.symlink("/", tmp_path / "etc" / "root")
    assert list(snapshot((str(tmp_path / "etc"),))) == [f"{tmp_path}/etc/root"]
