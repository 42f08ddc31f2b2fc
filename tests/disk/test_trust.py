"""One private-path check for every path vmshield trusts (issue 21, part 4): nbd_plugin.trust.

Each user of it (the run directory, the host key, hook.conf, job files, the server's log and
pid files, the numba cache, the erase journal) meets the same three attacks: the last
component swapped for a symlink to a copy that would pass, a directory above it that others
can write, and the entry given to another user. Each is refused; the untouched path is
taken, so the test can fail.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from keystore import paths
from keystore.services import hookconf, jobs, nbdproc, unlock
from nbd_plugin.crypto import jit
from nbd_plugin.erase import safefile
from nbd_plugin.errors import VmshieldError

NOBODY = 65534

#: name -> (make the legitimate entry at `path`, use it: returns normally or raises)
Use = Callable[[Path], object]
FILES: dict[str, tuple[Callable[[Path], None], Use]] = {
    "host key": (lambda p: p.write_bytes(b"ab" * 32), unlock.read_host_key),
    "hook.conf": (lambda p: p.write_text("[vmshield]\ndb = /var/lib/x.db\n"), hookconf.load),
    "job file": (lambda p: p.write_text('{"id": "x"}'), jobs.read),
    "server log": (lambda p: p.write_text("nbdkit: started\n"), lambda p: nbdproc.read_own(p, 64)),
    "erase journal": (
        lambda p: p.write_text("{}"),
        lambda p: safefile.read_own_file(str(p), "erase journal"),
    ),
}
DIRS: dict[str, Use] = {
    "run dir": paths.private_dir,
    "numba cache": lambda p: jit._private_dir(str(p)) or _raise(PermissionError("untrusted")),
}


def _raise(e: Exception) -> None:
    raise e


def _refused(use: Use, path: Path) -> None:
    """Each caller refuses with its own error: the product's, or EPERM (nbdproc.read_own)."""
    with pytest.raises((VmshieldError, PermissionError)):
        use(path)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    d = tmp_path / "a" / "b"
    d.mkdir(parents=True, mode=0o700)
    (tmp_path / "a").chmod(0o755)
    return d


def _file(base: Path, name: str) -> tuple[Path, Use]:
    make, use = FILES[name]
    path = base / "entry"
    make(path)
    path.chmod(0o600)
    use(path)  # the untouched file is taken
    return path, use


@pytest.mark.parametrize("name", list(FILES))
def test_a_symlink_swapped_in_for_a_file_is_refused(base: Path, name: str) -> None:
    path, use = _file(base, name)
    copy = base / "copy"
    shutil.copy2(path, copy)
    path.unlink()
    path.symlink_to(copy)
    _refused(use, path)


@pytest.mark.parametrize("name", [n for n in FILES if n != "erase journal"])
def test_a_file_under_a_group_writable_directory_is_refused(base: Path, name: str) -> None:
    path, use = _file(base, name)
    base.parent.chmod(0o775)  # not the file's own directory: one above it
    _refused(use, path)


def test_the_erase_journal_alone_lives_beside_its_target_in_a_shared_directory(
    base: Path,
) -> None:
    """The one exception the rules name: the journal is checked on its descriptor only."""
    path, use = _file(base, "erase journal")
    base.chmod(0o1777)
    base.parent.chmod(0o777)
    assert use(path) == b"{}"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give a file to another user")
@pytest.mark.parametrize("name", list(FILES))
def test_a_file_of_another_user_is_refused(base: Path, name: str) -> None:
    path, use = _file(base, name)
    os.chown(path, NOBODY, NOBODY)
    _refused(use, path)


@pytest.mark.parametrize("name", list(DIRS))
def test_directories_meet_the_same_three_attacks(tmp_path: Path, name: str) -> None:
    use = DIRS[name]
    parent = tmp_path / "p"
    parent.mkdir(mode=0o700)
    d = parent / "d"
    d.mkdir(mode=0o700)
    use(d)  # the untouched directory is taken
    parent.chmod(0o770)
    _refused(use, d)
    parent.chmod(0o700)
    use(d)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    d.rmdir()
    d.symlink_to(elsewhere)
    _refused(use, d)
    d.unlink()
    d.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(d, NOBODY, NOBODY)
        _refused(use, d)
