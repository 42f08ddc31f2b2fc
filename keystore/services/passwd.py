"""Changing a user's password: every disk's keyslot, then the verifier, all or none.

The password is the keystore verifier *and* the passphrase of the user's keyslot on every
disk they own, so a change moves each disk's keyslot from the old to the new password and
changes the verifier last. What may stop it and what then happens:

- a disk cannot be changed (served read-write, missing): the disks already moved are moved
  back, the verifier is untouched, the error names the disk;
- SIGINT, SIGTERM, SIGHUP: noted, never acted on in the middle of a disk (the new keyslot
  is written before the old one is wiped, so a disk is never between passwords); after the
  current disk, the moved disks are moved back and it ends with `Interrupted` (exit 130);
- SIGKILL, a crash, a power cut: the journal (`<keystore dir>/passwd/USER.json`, no
  secrets: disk names and steps, replaced atomically) says where it stood. Running the same
  `vmshield user passwd USER` again completes it: a disk the new password already opens is
  done (one caught between its two keyslot writes loses the old one), the others are moved.

Each disk's step is audited (`user.passwd.disk`), and so are an interruption and a resume.
Re-running also completes a change interrupted before journals existed: a disk that the
current password does not open but the new one does counts as done.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from keystore import paths
from keystore.errors import Conflict, KeystoreError
from keystore.models import Disk, DiskState
from keystore.repository import Repository
from keystore.services import interrupts, verifier
from keystore.services.disks import DiskOpError, change_key
from keystore.services.progress import Progress, Report, silent
from keystore.services.store import Keystore

VERSION = 1

PENDING, MOVING, MOVED, RESTORED, FAILED = "pending", "moving", "moved", "restored", "failed"
#: opens with neither password: an interrupted change moved it to that change's new password
FOREIGN = "foreign"


class Foreign(DiskOpError):
    """A disk that opens with neither password of this change."""


class PasswordNotChanged(KeystoreError):
    """Some disk could not be moved to the new password; every other one was moved back."""


@dataclasses.dataclass(frozen=True)
class Kdf:
    """The cost of the keyslots written (as `--pbkdf-iterations` / `--iter-time`)."""

    iterations: int | None = None
    iter_time_ms: int = 2000


def journal_dir(store: Keystore) -> Path:
    """Where password-change journals live: in the keystore's state directory."""
    return store.state_dir() / "passwd"


class Journal:
    """The journal of one user's password change: disk name -> step, written at each step."""

    def __init__(self, path: Path, user: str, state: dict[str, Any]) -> None:
        self.path = path
        self.user = user
        self.state = state

    @property
    def steps(self) -> dict[str, str]:
        steps: dict[str, str] = self.state["disks"]
        return steps

    def set(self, disk: str, step: str) -> None:
        self.steps[disk] = step
        self.save()

    def save(self) -> None:
        from nbd_plugin.osutil.files import replace_file

        blob = json.dumps(self.state, sort_keys=True).encode()
        try:
            replace_file(str(self.path), blob, 0o600, create_dir=0o700)
        except OSError as e:
            raise KeystoreError(f"cannot write the journal {self.path}: {e.strerror}") from None

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)


#: the largest password-change journal read (a few hundred bytes per disk)
MAX_JOURNAL = 16 << 20


def load_journal(store: Keystore, user: str) -> Journal | None:
    """The journal of an unfinished password change of `user`, None if there is none."""
    from nbd_plugin import trust

    path = journal_dir(store) / f"{user}.json"
    try:
        blob = trust.read_file(path, "password-change journal", MAX_JOURNAL)
    except FileNotFoundError:
        return None
    except (trust.Untrusted, OSError) as e:
        why = f"password-change journal {path}: {e.strerror or e}" if isinstance(e, OSError) else e
        raise KeystoreError(f"{why}; inspect it and remove it to start over") from None
    try:
        state = json.loads(blob)
        ok = state.get("version") == VERSION and isinstance(state.get("disks"), dict)
    except (ValueError, AttributeError, RecursionError):
        ok = False
    if not ok:
        raise KeystoreError(
            f"password-change journal {path} is unreadable: remove it, then run "
            f"`vmshield user passwd {user}` again (each disk that the new password already "
            "opens counts as done)"
        )
    return Journal(path, user, state)


@contextlib.contextmanager
def _one_at_a_time(store: Keystore, user: str) -> Iterator[None]:
    directory = journal_dir(store)
    try:
        paths.private_dir(directory)
        fd = os.open(directory / f"{user}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise KeystoreError(
            f"cannot keep the password-change journal in {directory} ({e.strerror}): "
            "nothing was changed"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise Conflict(f"a password change of {user} is already running") from None
        yield
    finally:
        os.close(fd)


def _opens(path: str, secret: bytes) -> bool:
    from nbd_plugin import luks
    from nbd_plugin.errors import InvalidPassphrase, VmshieldError

    try:
        luks.open_volume(path, secret, readonly=True).close()
    except InvalidPassphrase:
        return False
    except (VmshieldError, OSError):
        return False
    return True


def _drop_old_keyslot(path: str, old: bytes) -> None:
    from nbd_plugin import luks
    from nbd_plugin.errors import InvalidPassphrase

    with contextlib.suppress(InvalidPassphrase):
        luks.remove_key(path, old)


class _Change:
    """One run of a password change (the secrets stay in the caller's buffers)."""

    def __init__(
        self,
        store: Keystore,
        user: str,
        old: bytes,
        new: bytes,
        kdf: Kdf,
        who: str,
        report: Callable[[str], None],
    ) -> None:
        self.store, self.user, self.old, self.new = store, user, old, new
        self.kdf, self.who, self.report = kdf, who, report

    def audit(self, action: str, detail: dict[str, Any]) -> None:
        self.store.run(
            lambda r: r.append_audit(self.who, action, None, {"user": self.user, **detail})
        )

    def move(self, disk: Disk, step: str) -> str:
        """Move one disk to the new password; how ("rekeyed" or "already"). DiskOpError if
        it cannot be: opens with neither password, busy, missing."""
        if step == MOVING and _opens(disk.path, self.new):
            _drop_old_keyslot(disk.path, self.old)  # caught between its two keyslot writes
            return "already"
        try:
            change_key(disk.path, self.old, self.new, iterations=self.kdf.iterations,
                       iter_time_ms=self.kdf.iter_time_ms)  # fmt: skip
            return "rekeyed"
        except DiskOpError as e:
            if _opens(disk.path, self.new):
                return "already"  # moved by an earlier, interrupted run
            if "no keyslot opens" in str(e) and not _opens(disk.path, self.old):
                raise Foreign(
                    "opens with neither the current nor this new password: an interrupted "
                    "password change moved it to its new password; run again with that one"
                ) from None
            raise

    def restore(self, disk: Disk) -> str | None:
        """Move one disk back; None, or why it could not be."""
        try:
            change_key(disk.path, self.new, self.old, iterations=self.kdf.iterations,
                       iter_time_ms=self.kdf.iter_time_ms)  # fmt: skip
            return None
        except DiskOpError as e:
            return str(e)


async def owned_disks(repo: Repository, owner: str) -> list[Disk]:
    """The disks of every VM `owner` owns that have an image (state ready)."""
    return [
        d
        for v in await repo.list_vms(owner)
        for d in await repo.list_disks(v.name)
        if d.state is DiskState.READY
    ]


def change_password(
    store: Keystore,
    user: str,
    old: bytes,
    new: bytes,
    *,
    kdf: Kdf = Kdf(),
    who: str,
    report: Callable[[str], None] = lambda line: None,
    progress: Report = silent,
) -> int:
    """Move every disk of `user` from `old` to `new`, then the verifier; the number of
    disks. The caller has authenticated `user` with `old`. Raises PasswordNotChanged (a
    disk could not be moved; the others were moved back) or Interrupted (a signal; moved
    back); either way the verifier still takes `old`. `progress` gets a line as each disk
    and the verifier begin, with the time left (a disk's re-key runs its old keyslot's
    and its new keyslot's key derivation: about twice --iter-time)."""
    if old == new:
        raise ValueError("the new password is the current one")
    with _one_at_a_time(store, user), interrupts.deferred_signals() as stop:
        disks = store.run(lambda r: owned_disks(r, user))
        run = _Change(store, user, old, new, kdf, who, report)
        journal = load_journal(store, user)
        if journal is not None:
            since = journal.state.get("started", "?")
            report(f"completing the password change of {user} interrupted at {since}")
            run.audit("user.passwd.resume", {"started": since})
        else:
            journal = Journal(
                journal_dir(store) / f"{user}.json",
                user,
                {
                    "version": VERSION,
                    "user": user,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                    "pid": os.getpid(),
                    "disks": {},
                },
            )
        for d in disks:
            journal.steps.setdefault(d.name, PENDING)
        journal.save()
        steps = Progress(progress, len(disks) + 1, estimate=2 * kdf.iter_time_ms / 1000)
        failures = _forward(run, journal, disks, stop, steps)
        if failures or stop.signum is not None:
            _backward(run, journal, disks, failures, stop)
        journal.state["phase"] = "verifier"
        journal.save()
        steps.step(f"the keystore verifier of {user}", index=len(disks) + 1)
        # the verifier is made at least as costly as every re-keyed keyslot (issue 20 B5)
        policy = verifier.covering_policy(d.path for d in disks)
        store.run(lambda r: r.set_password(user, new, actor=who), policy=policy)
        journal.remove()
        return len(disks)


def _forward(
    run: _Change,
    journal: Journal,
    disks: Sequence[Disk],
    stop: interrupts.Pending,
    steps: Progress,
) -> list[tuple[str, str]]:
    failures: list[tuple[str, str]] = []
    for i, d in enumerate(disks, 1):
        if stop.signum is not None:
            break
        steps.step(f"disk {d.name}: re-keying", index=i)
        step = journal.steps.get(d.name, PENDING)
        try:
            journal.set(d.name, MOVING)
            try:
                how = run.move(d, step)
            except DiskOpError as e:
                failures.append((d.name, str(e)))
                run.report(f"disk {d.name}: not re-keyed: {e}")
                journal.set(d.name, FOREIGN if isinstance(e, Foreign) else FAILED)
                run.audit("user.passwd.disk", {"disk": d.name, "step": "failed", "why": str(e)})
                break
            journal.set(d.name, MOVED)
            run.audit("user.passwd.disk", {"disk": d.name, "step": how})
        except KeystoreError as e:  # the journal or the audit trail cannot be written
            failures.append((d.name, str(e)))
            break
        said = "re-keyed" if how == "rekeyed" else "already opens with the new password"
        run.report(f"disk {d.name}: {said} ({i}/{len(disks)})")
    return failures


def _backward(
    run: _Change,
    journal: Journal,
    disks: Sequence[Disk],
    failures: list[tuple[str, str]],
    stop: interrupts.Pending,
) -> None:
    moved = [d for d in disks if journal.steps.get(d.name) == MOVED]
    if stop.signum is not None:
        run.report(f"{stop.name}: moving {len(moved)} disk(s) back to the current password")
    stuck: list[str] = []
    for d in reversed(moved):
        why = run.restore(d)
        if why is None:
            _quietly(journal.set, d.name, RESTORED)
            _quietly(run.audit, "user.passwd.disk", {"disk": d.name, "step": "restored"})
            run.report(f"disk {d.name}: back on the current password")
        else:
            detail = {"disk": d.name, "step": "restore-failed", "why": why}
            _quietly(run.audit, "user.passwd.disk", detail)
            stuck.append(f"disk {d.name} still opens with the NEW password only ({why})")
    foreign = [n for n, step in journal.steps.items() if step == FOREIGN]
    if not stuck and not foreign:
        journal.remove()
    tail = (
        "; ".join(stuck) + f"; run `vmshield user passwd {run.user}` again with the same new "
        "password to complete the change"
        if stuck
        else "every disk and the keystore still take the current password"
    )
    if stop.signum is not None:
        _quietly(
            run.audit, "user.passwd.interrupted", {"signal": stop.name, "restored": len(moved)}
        )
        raise interrupts.Interrupted(
            f"password change of {run.user} interrupted by {stop.name}: {tail}", stop.signum
        )
    named = "; ".join(f"disk {name}: {why}" for name, why in failures)
    raise PasswordNotChanged(
        f"password not changed ({named}): {tail}; fix the disk and run "
        f"`vmshield user passwd {run.user}` again"
    )


def _quietly(step: Callable[..., None], *args: Any) -> None:
    """Bookkeeping while moving disks back: a journal or audit write that fails must not
    stop the disks from being restored (the restore itself is what matters)."""
    with contextlib.suppress(KeystoreError):
        step(*args)
