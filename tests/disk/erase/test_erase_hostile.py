"""Erase against a hostile directory (issue 12 #3, #10, #13, #16).

Whoever can write to the image's directory can swap the image's name for a symlink while the
erase runs, plant symlinks at the names of the erase's own files, hard-link the image, or
plant a journal. None of it may overwrite another file or buy a false certificate.
"""

from __future__ import annotations

import hashlib
import json
import os
import pwd
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
from click.testing import CliRunner

from keystore.cli import main
from nbd_plugin.erase import EraseOptions, erase
from nbd_plugin.erase.journal import JournalState, journal_path
from nbd_plugin.erase.storage import assess_path
from nbd_plugin.errors import ImageError
from tests.support.erase import MIB, make_luks, opens

KEEP = EraseOptions(discard=False, unlink=False)
RACES = 16
"""Erases raced by the swapper: before the fix one in a few already wrote the victim."""
SWAPPER = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
a, b = os.fsencode(sys.argv[1]), os.fsencode(sys.argv[2])
print("swapping", flush=True)
while libc.renameat2(-100, a, -100, b, 2) == 0:  # RENAME_EXCHANGE, until one name is gone
    pass
"""
"""Swaps two names atomically (renameat2 RENAME_EXCHANGE) as fast as it can, in its own
process so that it really runs while the erase does."""


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _small_luks(path: Path) -> None:
    make_luks(path, size=4 * MIB, data=False)
    with open(path, "r+b") as f:
        f.seek(2 * MIB)
        f.write(os.urandom(2 * MIB))


def test_swapping_the_name_for_a_symlink_never_touches_another_file(tmp_path: Path) -> None:
    victim = tmp_path / "victim.img"
    _small_luks(victim)
    before = _digest(victim)
    name, alt = tmp_path / "disk.img", tmp_path / "alt"
    outcomes: dict[str, int] = {}
    for attempt in range(RACES):
        for p in (name, alt):
            if p.is_symlink() or p.exists():
                p.unlink()
        _small_luks(name)
        alt.symlink_to(victim)
        swapper = subprocess.Popen(
            [sys.executable, "-c", SWAPPER, str(name), str(alt)], stdout=subprocess.PIPE
        )
        try:
            assert swapper.stdout is not None and swapper.stdout.readline() == b"swapping\n"
            cert = erase(str(name), "zero", EraseOptions(discard=False))
            key = "unlinked" if cert.data["unlinked"] else "erased, name swapped away"
        except ImageError as e:
            assert "symbolic link" in str(e) or "LUKS header" in str(e), e
            key = "refused"
        finally:
            swapper.kill()
            swapper.wait()
        outcomes[key] = outcomes.get(key, 0) + 1
        jp = Path(journal_path(str(name), block_device=False))
        if jp.exists():
            jp.unlink()
        assert _digest(victim) == before, f"attempt {attempt}: the victim was written"
    assert opens(victim)
    print(f"outcomes of {RACES} raced erases:", outcomes)
    assert sum(outcomes.values()) == RACES, outcomes


def test_planted_symlinks_at_the_erase_files_are_not_followed(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    make_luks(img)
    victims = {}
    for suffix in (".vmshield-erase.tmp", ".erase-certificate.json.tmp", ".erase-certificate.json"):
        v = tmp_path / f"victim{suffix.replace('.', '-')}"
        v.write_text("precious\n")
        victims[v] = v.read_text()
        (tmp_path / f"disk.img{suffix}").symlink_to(v)
    cert = erase(str(img), "zero")
    for v, text in victims.items():
        assert v.read_text() == text
    certificate = Path(cert.path)
    assert not certificate.is_symlink() and json.loads(certificate.read_text())["unlinked"]


def test_planted_symlink_journal_is_refused(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    make_luks(img)
    other = tmp_path / "other"
    other.write_text("{}")
    Path(journal_path(str(img), block_device=False)).symlink_to(other)
    with pytest.raises(ImageError, match="symbolic link is refused"):
        erase(str(img), "zero", KEEP)
    assert opens(img)


def test_a_huge_planted_journal_is_refused_unread(tmp_path: Path) -> None:
    """Issue 20 C: read_own_file read a file of any size into memory (a sparse 100 GiB
    journal would take the erase's memory); it refuses one larger than a journal can be."""
    from nbd_plugin.erase import safefile

    img = tmp_path / "disk.img"
    make_luks(img)
    jp = Path(journal_path(str(img), block_device=False))
    with jp.open("wb") as f:
        f.truncate(safefile.MAX_OWN_FILE + 1)  # sparse: costs no disk space
    with pytest.raises(ImageError, match="larger than"):
        erase(str(img), "zero", KEEP)
    assert opens(img)


def test_not_a_luks_image_is_refused_without_force(tmp_path: Path) -> None:
    text = tmp_path / "notes.txt"
    text.write_text("a text file that nobody meant to erase\n" * 200)
    before = text.read_bytes()
    r = CliRunner().invoke(main, ["image", "erase", str(text), "-m", "zero", "--yes"])
    assert r.exit_code == 1
    assert "not a LUKS image" in r.output and "--force" in r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1
    assert text.read_bytes() == before
    r = CliRunner().invoke(main, ["image", "erase", str(text), "-m", "zero", "--yes", "--force"])
    assert r.exit_code == 0, r.output
    assert not text.exists()


def test_a_symlink_is_refused_and_the_target_left_alone(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    make_luks(img)
    before = _digest(img)
    link = tmp_path / "link.img"
    link.symlink_to(img)
    r = CliRunner().invoke(main, ["image", "erase", str(link), "-m", "zero", "--yes"])
    assert r.exit_code == 1 and "symbolic link" in r.output, r.output
    assert _digest(img) == before and link.is_symlink()


def test_a_hard_linked_image_is_refused_or_reported_honestly(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    make_luks(img)
    other = tmp_path / "second-name.img"
    os.link(img, other)
    before = _digest(img)
    with pytest.raises(ImageError, match="1 other hard link"):
        erase(str(img), "zero")
    assert _digest(img) == before
    cert = erase(str(img), "zero", EraseOptions(force=True))
    assert not img.exists() and other.exists() and not opens(other)
    assert cert.data["target"]["hard_links"] == 2
    assert cert.data["unlink"] == {"performed": True, "other_links": 1}


def _forged(img: Path, **changes: object) -> Path:
    st = os.stat(img)
    state = JournalState(
        target=str(img),
        identity=[st.st_dev, st.st_ino, st.st_size],
        method="zero",
        key=bytes(32).hex(),
        extents=[],
        key_regions=[],
        luks_version=1,
        started=0.0,
        storage=assess_path(str(img)),
        phase="unlink",
        verification={"performed": True, "result": "passed", "mismatched_bytes": 0},
        crypto={"performed": True, "verified": True},
    )
    for k, v in changes.items():
        setattr(state, k, v)
    jp = Path(journal_path(str(img), block_device=False))
    fd = os.open(jp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(state), f)
    return jp


@pytest.mark.parametrize("phase", ["unlink", "discard", "overwrite"])
def test_a_forged_journal_buys_no_certificate(tmp_path: Path, phase: str) -> None:
    img = tmp_path / "disk.img"
    make_luks(img)
    _forged(img, phase=phase, pass_index=1)
    with pytest.raises(ImageError, match="LUKS header"):
        erase(str(img), "zero")
    assert img.exists() and opens(img)
    assert not list(tmp_path.glob("*.erase-certificate.json"))


def test_a_forged_journal_that_hides_extents_is_caught(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    make_luks(img)
    # a journal that lists only the header as written: the data extents would stay
    _forged(img, phase="crypto", key_regions=[[0, 4096]], extents=[[0, 4096, 0]])
    with pytest.raises(ImageError, match="outside what the journal"):
        erase(str(img), "zero")
    assert img.exists()
    assert not list(tmp_path.glob("*.erase-certificate.json"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to create another user's file")
def test_a_journal_of_another_user_is_refused(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    make_luks(img)
    jp = _forged(img)
    nobody = pwd.getpwnam("nobody")
    os.chown(jp, nobody.pw_uid, nobody.pw_gid)
    with pytest.raises(ImageError, match="may be forged"):
        erase(str(img), "zero")
    assert opens(img)


@pytest.mark.parametrize(
    "edit",
    [
        {"identity": "x"},
        {"extents": [[0, -1, 0]]},
        {"key": "zz" * 32},
        {"phase": "done"},
        {"pass_index": 1.5},
        {"crypto": []},
    ],
)
def test_a_malformed_journal_is_one_clear_error(tmp_path: Path, edit: dict[str, object]) -> None:
    img = tmp_path / "disk.img"
    make_luks(img)
    jp = _forged(img)
    data = json.loads(jp.read_text())
    data.update(edit)
    jp.write_text(json.dumps(data))
    with pytest.raises(ImageError, match=r"malformed|another file"):
        erase(str(img), "zero")
    assert opens(img)
