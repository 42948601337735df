"""Fixtures for the gateway tests that need the machine's help (a directory no one can write)."""

from __future__ import annotations

import os
import subprocess

import pytest


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory in which nobody, root included, can create a file.

    For a normal user, mode 0555 is enough. Root writes through permission bits, so then the
    immutable attribute (ext4 and most local file systems), or else a read-only tmpfs mount."""
    path = tmp_path / "read-only"
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        undo = lambda: path.chmod(0o755)  # noqa: E731
    elif subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
        undo = lambda: subprocess.run(["chattr", "-i", str(path)], check=True)  # noqa: E731
    elif subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(path)],
                        capture_output=True).returncode == 0:
        undo = lambda: subprocess.run(["umount", str(path)], check=True)  # noqa: E731
    else:
        pytest.skip("as root, a read-only directory needs chattr +i or a tmpfs mount; neither is permitted here")
    try:
        with pytest.raises(OSError):  # otherwise the tests that use it prove nothing
            (path / "probe").touch()
        yield path
    finally:
        undo()
