"""Starting and stopping nbdkit processes: the per-disk server and the host server.

`start` runs

    nbdkit -U SOCK -P PIDFILE --log=stderr [-r] python nbd_plugin/plugin.py \\
        image=PATH passphrase=-FD

with the passphrase written into a pipe whose read end (FD) nbdkit inherits: it never
appears in argv, the environment or a file. nbdkit forks into the background once the
plugin is configured (the keyslot is opened before the fork, so a wrong passphrase is a
non-zero exit here), writes PIDFILE and outlives this process. The server's stderr goes to
a log file next to the socket (mode 0600).

This module knows processes, sockets and pid files only, nothing of the keystore: the
workflows (keystore.services.serve, .hostdisk) and the lease holder (keystore.services.lease)
build on it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import shutil
import signal
import socket as socketmod
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from keystore import paths
from keystore.errors import KeystoreError
from nbd_plugin.serve.peers import Binding

NBD_MAGIC = b"NBDMAGIC"


def read_own(path: Path, limit: int) -> bytes:
    """The last `limit` bytes of a file only root or we can change (nbd_plugin.trust: never
    through a symlink); OSError (EPERM for an untrusted one) if it cannot be read."""
    from nbd_plugin import trust

    try:
        return trust.read_file(path, "file", limit, tail=True)
    except trust.Untrusted as e:
        raise PermissionError(errno.EPERM, str(e), str(path)) from None


class ServeError(KeystoreError):
    """nbdkit could not be started or did not answer; the message includes its log."""


def plugin_path() -> Path:
    """The nbdkit Python plugin file shipped in the nbd_plugin package."""
    import nbd_plugin

    return Path(nbd_plugin.__file__).parent / "plugin.py"


@dataclasses.dataclass(frozen=True)
class ServerFiles:
    """The socket of a server and the pid/log files kept beside it."""

    socket: Path

    @property
    def pidfile(self) -> Path:
        return self.socket.with_suffix(".pid")

    @property
    def logfile(self) -> Path:
        return self.socket.with_suffix(".log")

    @property
    def statsfile(self) -> Path:
        """The I/O counters the plugin publishes (`stats=`), read by `vmshield status`."""
        return self.socket.with_suffix(".stats")


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        return read_own(path, limit).decode(errors="replace").strip()
    except OSError:
        return ""


def probe(sock: Path, timeout: float = 1.0) -> bool:
    """True if an NBD server answers on `sock` (reads the newstyle greeting)."""
    s = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(sock))
        data = b""
        while len(data) < len(NBD_MAGIC):
            chunk = s.recv(len(NBD_MAGIC) - len(data))
            if not chunk:
                return False
            data += chunk
        return data == NBD_MAGIC
    except OSError:
        return False
    finally:
        s.close()


def start(
    image: Path,
    passphrase: bytes,
    files: ServerFiles,
    *,
    readonly: bool,
    timeout: float = 60.0,
    nbdkit: str = "nbdkit",
    keyslot: int | None = None,
    fence_fd: int | None = None,
    bind: Binding | None = None,
) -> int:
    """Start nbdkit for `image` on `files.socket`; return its pid once the socket answers.

    `keyslot`: the passphrase is for that keyslot only (a clevis token's).
    `fence_fd`: the read end of the lease holder's pipe (nbd_plugin/serve/fence.py).
    `bind`: only that VM's QEMU may connect (nbd_plugin/serve/peers.py)."""
    sock = files.socket
    exe = _prepare(
        nbdkit, sock, sock.parent, (sock, files.pidfile, files.logfile, files.statsfile),
        too_long=f"socket path {sock} is longer than 107 bytes; choose a shorter --socket",
    )  # fmt: skip
    r, w = os.pipe()
    try:
        os.write(w, passphrase)  # far below the pipe's capacity: never blocks
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    cmd = [exe, "-U", str(sock), "-P", str(files.pidfile), "--log=stderr"]
    if readonly:
        cmd.append("-r")
    cmd += ["python", str(plugin_path()), f"image={image}", f"passphrase=-{r}",
            f"stats={files.statsfile}"]  # fmt: skip
    if keyslot is not None:
        cmd.append(f"keyslot={keyslot}")
    if fence_fd is not None:
        cmd.append(f"fence=-{fence_fd}")
    if bind is not None:
        cmd.append(f"bind={bind.uuid}")
        if bind.domain is not None:
            cmd.append(f"bind_domain={bind.domain}")
    return _launch(
        cmd, "nbdkit", sock, files.pidfile, files.logfile, timeout=timeout, owned_fd=r,
        pass_fds=(r,) if fence_fd is None else (r, fence_fd),
    )  # fmt: skip


def _prepare(
    nbdkit: str, sock: Path, run_dir: Path, stale: tuple[Path, ...], *, too_long: str
) -> str:
    """nbdkit's path, once `sock` is free and `run_dir` private, with the `stale` files gone.

    ServeError with `too_long` if `sock` does not fit a unix socket address."""
    exe = shutil.which(nbdkit)
    if exe is None:
        raise ServeError("nbdkit not found: install the nbdkit and nbdkit-plugin-python packages")
    if len(os.fsencode(sock)) > 107:
        raise ServeError(too_long)
    if probe(sock):
        raise ServeError(f"something already serves on {sock}")
    paths.private_dir(run_dir)
    for path in stale:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # in a directory only we can write: a planted symlink goes too
    return exe


def _launch(
    cmd: list[str],
    what: str,
    sock: Path,
    pidfile: Path,
    logfile: Path,
    *,
    timeout: float,
    owned_fd: int | None = None,
    pass_fds: tuple[int, ...] = (),
    answers: Callable[[], bool] = lambda: True,
) -> int:
    """Run `cmd`, an nbdkit that forks into the background once configured, its output in
    `logfile` (mode 0600); its pid once `sock` answers and `answers()` holds.

    `what` names the server in the errors; `owned_fd` is closed here once nbdkit has it."""
    try:
        log_fd = os.open(logfile, paths.NEW_FILE, 0o600)
    except BaseException:
        if owned_fd is not None:
            os.close(owned_fd)
        raise
    try:
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, stdout=log_fd, stderr=log_fd, pass_fds=pass_fds,
            start_new_session=True, umask=0o077, timeout=timeout, check=False, env=_clean_env(),
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise ServeError(f"{what} did not start within {timeout:.0f} s") from e
    finally:
        if owned_fd is not None:
            os.close(owned_fd)
        os.close(log_fd)
    if proc.returncode != 0:
        raise ServeError(
            f"{what} failed to start (exit {proc.returncode}): {_tail(logfile) or 'no output'}"
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pid = read_pid(pidfile)
        if pid and probe(sock) and answers():
            return pid
        time.sleep(0.05)
    raise ServeError(f"{what} started but {sock} does not answer: {_tail(logfile)}")


def _clean_env() -> dict[str, str]:
    """The environment nbdkit gets: only what it needs (no secrets could leak through it)."""
    keep = ("PATH", "LANG", "LC_ALL", "PYTHONPATH", "TMPDIR", "HOME")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    # the plugin imports nbd_plugin from this checkout or installation
    root = str(plugin_path().parent.parent)
    env["PYTHONPATH"] = root + (":" + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    return env


def read_pid(pidfile: Path) -> int | None:
    try:
        return int(read_own(pidfile, 64).decode().strip())
    except (OSError, ValueError):
        return None


def is_our_server(pid: int, sock: Path) -> bool:
    """True if `pid` is alive and is an nbdkit listening on `sock` (not a recycled pid)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(argv) and os.path.basename(argv[0]) == b"nbdkit" and os.fsencode(sock) in argv


def _exited(pid: int) -> bool:
    """Has `pid` closed its files (gone, or a zombie)? Its command line empties when its memory
    is released, before its descriptors (and the image's locks) are: an exiting server no
    longer looks like ours while it still holds the image."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat[stat.rindex(")") + 2 :][:1] in ("Z", "X")


def stop(pid: int, files: ServerFiles, *, timeout: float = 10.0) -> bool:
    """SIGTERM the server if it is still ours; wait for it. False if it was not running."""
    running = is_our_server(pid, files.socket)
    if running:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while is_our_server(pid, files.socket) or not _exited(pid):
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    for f in (files.socket, files.pidfile):
        with contextlib.suppress(FileNotFoundError):
            f.unlink()
    return running


# -- the host server: one nbdkit for every disk (issue 22) --------------------------------

#: the NBD URI scheme QEMU takes for an export on a unix socket
_URI = "nbd+unix:///"


@dataclasses.dataclass(frozen=True)
class HostFiles:
    """The host disk server's files in a run directory: its NBD socket (every disk an
    export on it), its control socket, and its pid and log files."""

    run_dir: Path

    @property
    def socket(self) -> Path:
        return self.run_dir / "nbd.sock"

    @property
    def control(self) -> Path:
        return self.run_dir / "nbd-control.sock"

    @property
    def pidfile(self) -> Path:
        return self.run_dir / "nbd.pid"

    @property
    def logfile(self) -> Path:
        return self.run_dir / "nbd.log"


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """Where a recorded server serves its disk: a socket of its own (`export` None), or an
    export of a host server's socket. The keystore records it as one string: the socket
    path, or the export's NBD URI (`nbd+unix:///NAME?socket=PATH`)."""

    socket: Path
    export: str | None = None

    @classmethod
    def parse(cls, recorded: str) -> Endpoint:
        if recorded.startswith(_URI) and "?socket=" in recorded:
            name, _, sock = recorded[len(_URI) :].partition("?socket=")
            return cls(Path(sock), name)
        return cls(Path(recorded))

    def recorded(self) -> str:
        return str(self.socket) if self.export is None else export_uri(self.socket, self.export)


def export_uri(sock: Path | str, name: str) -> str:
    """The NBD URI of export `name` on unix socket `sock`."""
    return f"{_URI}{name}?socket={sock}"


def is_host_server(pid: int, files: HostFiles) -> bool:
    """True if `pid` is an nbdkit serving `files.socket` with the control socket `files.control`."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return (
        bool(argv)
        and os.path.basename(argv[0]) == b"nbdkit"
        and os.fsencode(files.socket) in argv
        and b"control=" + os.fsencode(files.control) in argv
    )


def start_host(files: HostFiles, *, timeout: float = 60.0, nbdkit: str = "nbdkit") -> int:
    """Start the host server in the background (no disk yet); its pid once both sockets answer.

    `nbdkit -U SOCK -P PIDFILE --log=stderr python plugin.py control=CONTROL`: the plugin
    binds the control socket before nbdkit forks, so a second server fails here at once."""
    exe = _prepare(
        nbdkit, files.socket, files.run_dir, (files.socket, files.pidfile, files.logfile),
        too_long=f"run directory {files.run_dir} is too long for a unix socket path",
    )  # fmt: skip
    cmd = [exe, "-U", str(files.socket), "-P", str(files.pidfile), "--log=stderr",
           "python", str(plugin_path()), f"control={files.control}"]  # fmt: skip
    return _launch(
        cmd, "the host disk server", files.socket, files.pidfile, files.logfile,
        timeout=timeout, answers=lambda: _answers(files.control),
    )  # fmt: skip


def _answers(path: Path) -> bool:
    s = socketmod.socket(socketmod.AF_UNIX, socketmod.SOCK_STREAM)
    s.settimeout(1.0)
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        s.close()
