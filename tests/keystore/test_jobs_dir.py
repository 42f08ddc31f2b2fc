"""Issue 20 B6: the background-job files never follow a link, in a directory that is ours.

The destroy worker runs as root and rewrites `<keystore dir>/jobs/<id>.json` as it goes; a
planted link or a directory another user controls must not turn that into a root write."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from keystore.errors import KeystoreError
from keystore.services import jobs

JOB = {"id": "destroy-x", "disk": "web-0", "method": "zero", "state": "done", "started": 1.0}


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"
    path.write_text("precious\n")
    return path


def test_a_planted_temporary_link_is_not_followed(tmp_path: Path, victim: Path) -> None:
    d = tmp_path / "ks" / "jobs"
    d.mkdir(parents=True, mode=0o700)
    path = d / "destroy-x.json"
    (d / "destroy-x.tmp").symlink_to(victim)  # the old fixed temporary name
    jobs.write(path, JOB)
    jobs.write(path, JOB)
    assert victim.read_text() == "precious\n"
    assert not path.is_symlink() and jobs.read(path)["id"] == "destroy-x"
    assert [p.name for p in d.iterdir() if p.name.endswith(".tmp")] == ["destroy-x.tmp"]


def test_a_job_file_that_is_a_link_is_replaced_not_followed(tmp_path: Path, victim: Path) -> None:
    d = tmp_path / "ks" / "jobs"
    d.mkdir(parents=True, mode=0o700)
    path = d / "destroy-x.json"
    path.symlink_to(victim)
    with pytest.raises(KeystoreError, match="link"):
        jobs.read(path)  # reading refuses it
    jobs.write(path, JOB)  # writing replaces the link itself
    assert victim.read_text() == "precious\n" and not path.is_symlink()


def test_a_jobs_dir_that_is_a_link_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    (tmp_path / "ks").mkdir()
    (tmp_path / "ks" / "jobs").symlink_to(elsewhere)
    with pytest.raises(KeystoreError, match="symlink"):
        jobs.write(tmp_path / "ks" / "jobs" / "destroy-x.json", JOB)
    assert list(elsewhere.iterdir()) == []


def test_a_jobs_dir_of_another_user_is_refused(tmp_path: Path) -> None:
    assert os.geteuid() == 0, "the suite runs as root (it starts libvirtd, mounts loops)"
    d = tmp_path / "ks" / "jobs"
    d.mkdir(parents=True, mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(KeystoreError, match="uid 65534"):
        jobs.write(d / "destroy-x.json", JOB)
    assert list(d.iterdir()) == []


def test_a_jobs_dir_others_can_write_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "ks" / "jobs"
    d.mkdir(parents=True)
    d.chmod(0o777)
    with pytest.raises(KeystoreError, match="writable by others"):
        jobs.write(d / "destroy-x.json", JOB)
    with pytest.raises(KeystoreError, match="writable by others"):
        jobs.new_file(d / "destroy-x.log")
    assert list(d.iterdir()) == []


def test_a_huge_job_file_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "jobs"
    d.mkdir(mode=0o700)
    big = d / "destroy-y.json"
    big.write_text('{"id": "' + "x" * (jobs.MAX_JOB_BYTES + 10) + '"}')
    with pytest.raises(KeystoreError, match="larger than"):
        jobs.read(big)
