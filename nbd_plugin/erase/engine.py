"""Deep erase of one image file or block device, resumable at any point.

Order: lock the target (refuse while a server holds it) → crypto-erase (overwrite the LUKS
header and every keyslot area several times, fdatasync: from here the data is unreadable) →
overwrite every allocated extent, pass by pass, fdatasync after each → read the last pass back
and compare → discard (punch hole / BLKDISCARD / BLKSECDISCARD) → unlink → certificate.

Each step records itself in the journal (journal.py) before and after it runs; running the same
erase again after a crash or a kill continues from the last checkpoint and ends with the same
bytes on the medium as an uninterrupted run. What a journal claims is checked against the
medium (recheck.py) before discard and unlink, so a planted journal cannot buy a certificate.

The target is opened once, without following a symlink, relative to a descriptor of its
directory; every step uses those descriptors, and the unlink goes through the directory after
checking that the name still refers to the erased inode.
"""

from __future__ import annotations

import errno
import os
import time
from dataclasses import asdict, dataclass

from nbd_plugin.erase import journal as jn
from nbd_plugin.erase import recheck, sharing, storage
from nbd_plugin.erase.certificate import Certificate, build, default_path, write
from nbd_plugin.erase.journal import JournalState, Phase
from nbd_plugin.erase.methods import Method, Pattern, get_method
from nbd_plugin.erase.overwrite import (
    Engine,
    Progress,
    Target,
    close_target,
    open_target,
    sync,
)
from nbd_plugin.erase.progress import Reporter
from nbd_plugin.errors import ImageBusy, ImageError, UnsupportedError
from nbd_plugin.luks import luks_version, wipe_regions
from nbd_plugin.osutil import blockdev
from nbd_plugin.osutil.extents import Extent, allocated_extents, punch_hole
from nbd_plugin.osutil.locking import hold_image

HEADER_WIPES = 3
"""Overwrites of the key material, each fdatasync'ed (keystream passes -1, -2, -3)."""


@dataclass(frozen=True)
class EraseOptions:
    """How to erase; the defaults follow the full order of DESIGN.md."""

    verify: bool = True
    discard: bool = True
    unlink: bool = True
    secure_discard: bool = False
    certificate_path: str | None = None
    journal_path: str | None = None
    checkpoint_bytes: int = 512 << 20
    checkpoint_seconds: float = 2.0
    erase_key: bytes | None = None
    """Keystream key of a new erase (default: 32 bytes from os.urandom). Fixing it makes two
    erases of identical images write identical bytes (tests, audits); a resumed erase always
    takes the key from its journal."""
    force: bool = False
    """Erase a target that is not a LUKS image, or a file with other hard links."""


def _ext(state: JournalState) -> list[Extent]:
    return [Extent(o, n, bool(s)) for o, n, s in state.extents]


def _regions(state: JournalState) -> list[Extent]:
    return [Extent(o, n) for o, n in state.key_regions]


class _Eraser:
    """One run of an erase: holds the open target, its lock, the journal and the reporter."""

    def __init__(
        self, target: Target, state: JournalState, jpath: str, opts: EraseOptions, rep: Reporter
    ) -> None:
        self.target, self.state, self.jpath, self.opts, self.rep = target, state, jpath, opts, rep
        self.engine = Engine(target, state.erase_key)

    def save(self) -> None:
        jn.save(self.jpath, self.state)

    def _checkpointer(self, phase_total: int) -> Progress:
        """Progress callback that also fdatasyncs and records the position now and then."""
        last = [self.state.done, time.monotonic()]

        def progress(pos: int) -> None:
            self.rep.update(pos)
            now = time.monotonic()
            if (
                pos - last[0] >= self.opts.checkpoint_bytes
                or now - last[1] >= self.opts.checkpoint_seconds
            ) and pos < phase_total:
                sync(self.target)
                self.state.done = pos
                self.save()
                last[0], last[1] = pos, now

        return progress

    def crypto(self) -> None:
        regions = _regions(self.state)
        if not regions:
            self.state.crypto = {"performed": False, "reason": "not a LUKS image"}
            return
        total = sum(r.length for r in regions)
        t0 = time.monotonic()
        self.rep.start(Phase.CRYPTO, "wiping key material", total * HEADER_WIPES)
        for i in range(HEADER_WIPES):
            base = i * total

            def progress(pos: int, base: int = base) -> None:
                self.rep.update(base + pos)

            self.engine.run_pass(Pattern.RANDOM, -1 - i, regions, 0, progress)
            sync(self.target)
        self.rep.end()
        bad, first = self.engine.verify(Pattern.RANDOM, -HEADER_WIPES, regions, lambda p: None)
        if bad:
            raise ImageError(
                f"{self.target.path}: key material still reads back at byte {first} after the "
                "wipe; the storage does not take writes: the image is NOT erased"
            )
        self.state.crypto = {
            "performed": True,
            "luks_version": self.state.luks_version,
            "regions": self.state.key_regions,
            "overwrites": HEADER_WIPES,
            "bytes": total * HEADER_WIPES,
            "seconds": round(time.monotonic() - t0, 4),
            "verified": True,
        }

    def overwrite(self, method: Method) -> None:
        extents = _ext(self.state)
        total = sum(e.length for e in extents)
        while self.state.pass_index < len(method.passes):
            number = self.state.pass_index + 1
            pattern = method.passes[self.state.pass_index]
            start = self.state.done
            label = f"pass {number}/{len(method.passes)} ({pattern.value})"
            self.rep.start(f"pass{number}", label, total, start)
            # The pass's clock: from before its first write to after its last fdatasync,
            # as wall-clock times too, so an outside observer can check them (issue 13).
            started_at, t0 = time.time(), time.monotonic()
            via = self.engine.run_pass(pattern, number, extents, start, self._checkpointer(total))
            sync_s = sync(self.target)
            seconds = time.monotonic() - t0
            finished_at = time.time()
            self.rep.end()
            written = total - start  # a resumed pass writes only what the last run had not
            self.state.passes.append(
                {
                    "number": number,
                    "pattern": pattern.value,
                    "bytes": total,
                    "written_bytes": written,
                    "seconds": round(seconds, 4),
                    "bytes_per_second": round(written / seconds) if seconds > 0 else None,
                    "started_unix": round(started_at, 3),
                    "finished_unix": round(finished_at, 3),
                    "fdatasync_seconds": round(sync_s, 4),
                    "via": via,
                    "resumed_at": start or None,
                }
            )
            self.state.pass_index += 1
            self.state.done = 0
            self.save()

    def verify(self, method: Method) -> None:
        if not self.opts.verify:
            self.state.verification = {"performed": False, "result": "skipped"}
            return
        if not method.passes:
            # crypto only: the key material was read back right after the wipe
            self.state.verification = {
                "performed": True,
                "scope": "key material",
                "bytes_read": sum(n for _, n in self.state.key_regions),
                "mismatched_bytes": 0,
                "result": "passed",
            }
            return
        extents = _ext(self.state)
        total = sum(e.length for e in extents)
        number = len(method.passes)
        self.rep.start(Phase.VERIFY, f"verifying pass {number}", total)
        t0 = time.monotonic()
        bad, first = self.engine.verify(method.passes[-1], number, extents, self.rep.update)
        self.rep.end()
        self.state.verification = {
            "performed": True,
            "scope": f"pass {number} over every allocated byte",
            "pattern": method.passes[-1].value,
            "bytes_read": total,
            "mismatched_bytes": bad,
            "first_mismatch": first,
            "direct_io": self.target.direct_fd is not None,
            "seconds": round(time.monotonic() - t0, 4),
            "result": "failed" if bad else "passed",
        }

    def recheck(self, method: Method, resumed_past_verify: bool) -> None:
        """Check the journal's claims against the medium before anything irreversible."""
        t, state = self.target, self.state
        where = recheck.luks_header_left(t.fd, state.identity[2])
        if where is not None:
            raise ImageError(
                f"{t.path} still holds a LUKS header at byte {where}, although the journal "
                f"{self.jpath} says its key material was wiped: the journal is forged or "
                "belongs to another image. Nothing was discarded or unlinked; remove the "
                "journal and run the erase again."
            )
        current = allocated_extents(t.fd)
        outside = recheck.first_uncovered(current, _ext(self.state) + _regions(self.state))
        if outside is not None:
            raise ImageError(
                f"{t.path} holds data at byte {outside}, outside what the journal "
                f"{self.jpath} says was overwritten (a forged journal, or the image was "
                "written since the erase started). Nothing was discarded or unlinked; remove "
                "the journal and run the erase again."
            )
        if not resumed_past_verify or not (state.verification or {}).get("performed"):
            return
        # what the journal says was verified: read what is still allocated once more
        if method.passes:
            pattern, number = method.passes[-1], len(method.passes)
            scope = recheck.clip(current, _ext(state))
        else:
            pattern, number = Pattern.RANDOM, -HEADER_WIPES
            scope = recheck.clip(current, _regions(state))
        bad, first = self.engine.verify(pattern, number, scope, lambda p: None)
        state.verification = {
            **(state.verification or {}),
            "rechecked_on_resume": {"bytes_read": sum(e.length for e in scope), "bad": bad},
        }
        if bad:
            state.verification.update(result="failed", mismatched_bytes=bad, first_mismatch=first)

    def discard(self) -> None:
        if not self.opts.discard:
            self.state.discard = {"performed": False}
            return
        t = self.target
        size = blockdev.device_size(t.fd)
        if t.block_device:
            how = "BLKSECDISCARD" if self.opts.secure_discard else "BLKDISCARD"
            request = blockdev.BLKSECDISCARD if self.opts.secure_discard else blockdev.BLKDISCARD
        else:
            how = "punch hole"
        try:
            if t.block_device:
                blockdev.blk_range_ioctl(t.fd, request, 0, size)
            else:
                punch_hole(t.fd, 0, size)
            sync(t)
            self.state.discard = {"performed": True, "how": how, "result": "done"}
        except OSError as e:
            if self.opts.secure_discard:
                raise ImageError(
                    f"{t.path}: the device refused BLKSECDISCARD ({e.strerror}); the overwrite "
                    "is complete, run again without --secure-discard to finish"
                ) from None
            unsupported = e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL)
            self.state.discard = {
                "performed": False,
                "how": how,
                "result": "unsupported" if unsupported else f"failed: {e.strerror}",
            }


def _new_state(path: str, target: Target, method: Method, opts: EraseOptions) -> JournalState:
    st = os.fstat(target.fd)
    size = blockdev.device_size(target.fd)
    luks = luks_version(os.pread(target.fd, 8, 0))
    if luks is None and not method.overwrites:
        raise UnsupportedError(
            f"{path} is not a LUKS image: the crypto method has no key material to wipe; "
            "choose an overwrite method (zero, random, dod3...)"
        )
    if luks is None and not opts.force:
        raise ImageError(
            f"{path} is not a LUKS image (no LUKS header at its start): refusing to erase it. "
            "If you mean to destroy this file or device whatever it holds, add --force"
        )
    if not target.block_device and st.st_nlink > 1 and not opts.force:
        raise ImageError(
            f"{path} has {st.st_nlink - 1} other hard link(s): after the erase they would "
            "still name the (overwritten) file. Remove the other links first "
            f"(find / -xdev -inum {st.st_ino}), or add --force to erase and unlink this name"
        )
    extents = allocated_extents(target.fd)
    regions = wipe_regions(target.fd_path, size) if luks else []
    shared = any(e.shared for e in extents)
    if shared and not opts.force:
        found = sharing.sharers(path, target.fd)
        who = ", ".join(found) if found else (
            f"another file (a reflink copy or a snapshot; none found in "
            f"{os.path.dirname(os.path.abspath(path))})"
        )  # fmt: skip
        raise ImageError(
            f"{path} shares blocks with {who}: that copy keeps the LUKS header and keyslots "
            "and opens with the passphrase, and an overwrite here cannot reach the shared "
            "blocks; erase the copy first, or add --force to erase this file anyway (its "
            "certificate then says 'not assured', not Purge)"
        )
    return JournalState(
        storage=storage.assess_path(target.fd_path, shared_extents=shared),
        target=path,
        identity=[st.st_dev, st.st_ino, size],
        method=method.name,
        key=(opts.erase_key or os.urandom(32)).hex(),
        extents=[[e.offset, e.length, int(e.shared)] for e in extents],
        key_regions=[list(r) for r in _intersect(regions, extents)],
        luks_version=luks,
        started=time.time(),
        links=1 if target.block_device else st.st_nlink,
    )


def _intersect(regions: list[tuple[int, int]], extents: list[Extent]) -> list[tuple[int, int]]:
    """The parts of the key-material regions that hold blocks: holes hold no key material,
    and writing into them would only allocate new blocks."""
    out = []
    for off, n in regions:
        for e in extents:
            lo, hi = max(off, e.offset), min(off + n, e.offset + e.length)
            if hi > lo:
                out.append((lo, hi - lo))
    return out


def _lock(target: Target) -> None:
    """Refuse if anything uses the target: a server's flock, a mount or mapping of the device
    (O_EXCL), a loop device over the file."""
    try:
        hold_image(target.fd, target.path, exclusive=True)
    except ImageBusy:
        raise ImageBusy(
            f"{target.path} is in use: a server (nbdkit) or another erase holds its lock. "
            "Stop the server (or wait for the other erase) and run the erase again."
        ) from None
    if target.block_device:
        try:
            os.close(os.open(target.fd_path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            raise ImageBusy(
                f"{target.path} is in use: mounted, mapped (device-mapper, md, swap) or opened "
                "exclusively by another program; release it and run the erase again"
            ) from None
    else:
        loop = blockdev.loop_device_of(target.fd_path)
        if loop is not None:
            raise ImageBusy(
                f"{target.path} is attached to {loop}; detach it (losetup -d {loop}, or close "
                "the cryptsetup mapping over it) and run the erase again"
            )


def erase(
    path: str,
    method_name: str,
    options: EraseOptions | None = None,
    reporter: Reporter | None = None,
) -> Certificate:
    """Erase `path` with the named method; returns the written certificate.

    Raises ImageBusy when a server holds the image, ImageError/UnsupportedError when the target
    cannot be erased as asked, ValueError for an unknown method.
    """
    opts = options or EraseOptions()
    rep = reporter or Reporter()
    method = get_method(method_name)
    if not os.path.lexists(path):
        # Killed between unlink and certificate? The journal beside the file finishes it.
        jpath = opts.journal_path or jn.journal_path(path, block_device=False)
        state = jn.load(jpath)
        if state is not None and state.phase == Phase.UNLINK and state.method == method.name:
            state.resumed += 1
            return _finish(state, jpath, opts, path, False, unlinked=True)
        raise ImageError(f"{path}: no such file or block device")
    target = open_target(path)
    try:
        _lock(target)
        jpath = opts.journal_path or jn.journal_path(path, block_device=target.block_device)
        state = jn.load(jpath)
        st = os.fstat(target.fd)
        if state is not None:
            if state.identity != [st.st_dev, st.st_ino, blockdev.device_size(target.fd)]:
                raise ImageError(
                    f"the journal {jpath} belongs to another file that was at {path}; "
                    "remove the journal to erase this one"
                )
            if state.method != method.name:
                raise ImageError(
                    f"an erase of {path} with method {state.method!r} was interrupted; "
                    f"run it again with --method {state.method}, or remove {jpath} to start over"
                )
            state.resumed += 1
            rep.event(
                "resumed",
                **{"phase": state.phase, "pass": state.pass_index + 1, "done": state.done},
            )
        else:
            state = _new_state(path, target, method, opts)
        run = _Eraser(target, state, jpath, opts, rep)
        run.save()
        try:
            return _run(run, method, path)
        finally:
            run.engine.close()
    finally:
        close_target(target)
        rep.close()


def _run(run: _Eraser, method: Method, path: str) -> Certificate:
    state, opts, target = run.state, run.opts, run.target
    resumed_past_verify = state.resumed > 0 and state.phase in (Phase.DISCARD, Phase.UNLINK)
    if state.phase == Phase.CRYPTO:
        run.crypto()
        state.phase = Phase.OVERWRITE
        run.save()
    if state.phase == Phase.OVERWRITE:
        run.overwrite(method)
        state.phase = Phase.VERIFY
        run.save()
    if state.phase == Phase.VERIFY:
        run.verify(method)
        state.phase = Phase.DISCARD
        run.save()
    run.recheck(method, resumed_past_verify)
    if state.verification and state.verification.get("result") == "failed":
        state.discard = {"performed": False, "reason": "verification failed: kept for inspection"}
        return _finish(state, run.jpath, opts, path, target.block_device, unlinked=False)
    if state.phase == Phase.DISCARD:
        run.discard()
        state.phase = Phase.UNLINK
        run.save()
    unlinked = False
    if opts.unlink and not target.block_device:
        unlinked = _unlink(target, state)
    return _finish(state, run.jpath, opts, path, target.block_device, unlinked)


def _unlink(target: Target, state: JournalState) -> bool:
    """Remove the erased file's name, through its directory, if it still names that file."""
    st = os.fstat(target.fd)
    try:
        now = os.stat(target.name, dir_fd=target.dir_fd, follow_symlinks=False)
        same = (now.st_dev, now.st_ino) == (st.st_dev, st.st_ino)
    except FileNotFoundError:
        same = False
    if not same:
        state.unlink = {
            "performed": False,
            "reason": f"{target.path} was renamed or replaced during the erase: it no longer "
            f"names the erased file (inode {st.st_ino}), so nothing was unlinked",
        }
        return False
    os.unlink(target.name, dir_fd=target.dir_fd)
    os.fsync(target.dir_fd)
    state.unlink = {"performed": True, "other_links": st.st_nlink - 1}
    return True


def _finish(
    state: JournalState,
    jpath: str,
    opts: EraseOptions,
    path: str,
    block_device: bool,
    unlinked: bool,
) -> Certificate:
    """Write the certificate, then drop the journal: the erase is complete."""
    cert_path = opts.certificate_path or default_path(
        path, block_device=block_device, started=state.started
    )
    assessment = state.storage or {}
    data = build(
        state, size=state.identity[2], finished=time.time(), unlinked=unlinked, storage=assessment
    )
    shown = ("verify", "discard", "unlink", "secure_discard")
    data["options"] = {k: v for k, v in asdict(opts).items() if k in shown}
    cert = write(data, cert_path)
    jn.remove(jpath)
    return cert
