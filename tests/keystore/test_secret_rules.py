"""One set of rules for reading a secret, at every entry point (issue 21, part 4).

The same crafted inputs (empty, only a newline, a NUL byte, one byte over the limit, exactly
the limit, a CRLF ending) go through each entry point: the `vmshield` command's key file
(`--passphrase-file`), stdin line and hidden prompt on a terminal (what a terminal can
carry), the plugin's ``passphrase=+FILE``, ``-FD`` and literal, and a real nbdkit. A key
file is taken byte for byte (as cryptsetup --key-file), a line loses one "\\n"; empty is
refused, and so is anything over the limit. What is accepted must open the keyslot made with
exactly the expected bytes; what is refused says why in one line that holds no part of the
secret.
"""

from __future__ import annotations

import os
import pty
import select
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from keystore.cli import main
from keystore.sqlite import repository as sqlite_repo
from nbd_plugin import luks
from nbd_plugin.secrets import MAX_KEY_FILE, MAX_LINE, SecretError
from nbd_plugin.serve.config import ConfigError, ServerConfig
from nbd_plugin.serve.passphrase import read_passphrase
from tests.support.cli import FAST
from tests.support.nbd import plugin_args, read_at, run_nbdkit_expect_failure, serve_plugin

#: (case, bytes given, what a key file yields: the secret, or the error's words)
KEY_FILE = [
    ("empty", b"", "is empty"),
    ("newline", b"\n", b"\n"),
    ("nul", b"Zebra\0Quill", b"Zebra\0Quill"),
    ("over", b"k" * (MAX_KEY_FILE + 1), f"more than {MAX_KEY_FILE} bytes"),
    ("exact", b"k" * MAX_KEY_FILE, b"k" * MAX_KEY_FILE),
    ("crlf", b"Okapi-9\r\n", b"Okapi-9\r\n"),
]
#: the same cases as lines (typed, piped, a literal)
LINE = [
    ("empty", b"", "is empty"),
    ("newline", b"\n", "is empty"),
    ("nul", b"Zebra\0Quill\n", "NUL byte"),
    ("over", b"l" * (MAX_LINE + 1) + b"\n", f"longer than {MAX_LINE} bytes"),
    ("exact", b"l" * MAX_LINE + b"\n", b"l" * MAX_LINE),
    ("crlf", b"Okapi-9\r\n", b"Okapi-9\r"),
]
#: every secret some entry point accepts: each opens its own keyslot of the test image
ACCEPTED = [r for _, _, r in KEY_FILE + LINE if isinstance(r, bytes)]


def _no_trace_of(given: bytes, text: str) -> None:
    for part in (given[:7], given.strip()[-7:]):
        if len(part.strip(b"\n\0")) >= 5:
            assert part.decode(errors="replace") not in text, text


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LUKS1 image with one keyslot per accepted secret, keyslot i for ACCEPTED[i]."""
    path = tmp_path_factory.mktemp("secrets") / "d.img"
    luks.create_image(str(path), 1 << 20, ACCEPTED[0], fmt="luks1", iterations=1000)
    for secret in ACCEPTED[1:]:
        luks.add_key(str(path), ACCEPTED[0], secret, iterations=1000)
    return path


def _file(tmp_path: Path, given: bytes) -> Path:
    key = tmp_path / "key"
    key.write_bytes(given)
    return key


# -- the `vmshield` command --------------------------------------------------------------


@pytest.mark.parametrize(("case", "given", "result"), KEY_FILE, ids=[c for c, _, _ in KEY_FILE])
def test_cli_key_file(image: Path, tmp_path: Path, case: str, given: bytes, result: object) -> None:
    key = _file(tmp_path, given)
    r = CliRunner().invoke(main, ["image", "test-passphrase", str(image), "--passphrase-file",
                                  str(key)])  # fmt: skip
    _check_cli(r.exit_code, r.output, given, result)


@pytest.mark.parametrize(("case", "given", "result"), LINE, ids=[c for c, _, _ in LINE])
def test_cli_stdin_line(image: Path, case: str, given: bytes, result: object) -> None:
    r = CliRunner().invoke(main, ["image", "test-passphrase", str(image)], input=given)
    _check_cli(r.exit_code, r.output, given, result)


def _check_cli(code: int, output: str, given: bytes, result: object) -> None:
    if isinstance(result, bytes):
        assert code == 0, output
        assert f"keyslot {ACCEPTED.index(result)} opens" in output
        return
    assert code == 1, output
    assert str(result) in output and "Traceback" not in output
    assert output.count("\n") == 1, output  # one line
    _no_trace_of(given, output)


# -- the plugin: passphrase=+FILE, -FD, a literal ------------------------------------------


def _plugin(value: str) -> bytes | str:
    try:
        return bytes(read_passphrase(value))
    except SecretError as e:
        return str(e)


@pytest.mark.parametrize(("case", "given", "result"), KEY_FILE, ids=[c for c, _, _ in KEY_FILE])
def test_plugin_file_and_fd(tmp_path: Path, case: str, given: bytes, result: object) -> None:
    key = _file(tmp_path, given)
    fd = os.open(key, os.O_RDONLY)
    for got in (_plugin(f"+{key}"), _plugin(f"-{fd}")):
        if isinstance(result, bytes):
            assert got == result
        else:
            assert isinstance(got, str) and str(result) in got
            _no_trace_of(given, got)
    with pytest.raises(OSError):
        os.close(fd)  # the plugin closed the descriptor it read


@pytest.mark.parametrize(("case", "given", "result"), LINE, ids=[c for c, _, _ in LINE])
def test_plugin_literal(case: str, given: bytes, result: object) -> None:
    got = _plugin(given.decode())
    if isinstance(result, bytes):
        assert got == result
    else:
        assert isinstance(got, str) and str(result) in got
        _no_trace_of(given, got)
    config = ServerConfig()
    if isinstance(result, str):
        with pytest.raises(ConfigError, match=result):
            config.set("passphrase", given.decode())


def test_nbdkit_refuses_an_empty_key_file_and_takes_a_newline_byte_for_byte(
    image: Path, tmp_path: Path
) -> None:
    empty = _file(tmp_path, b"")
    r = run_nbdkit_expect_failure(plugin_args(image, empty))
    assert r.returncode != 0 and f"passphrase file {empty} is empty" in r.stderr
    newline = tmp_path / "nl"
    newline.write_bytes(b"\n")  # keyslot 1 of the image: the key file is one newline
    with serve_plugin(image, newline, tmp_path) as sock:
        assert len(read_at(sock, 512)) == 512


def test_a_new_password_from_a_crlf_pipe_is_refused_not_kept_with_its_cr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The line keeps its "\\r" (as cryptsetup): a new secret holding one is refused, with
    the reason, rather than made a password no one can type."""
    monkeypatch.setenv("VMSHIELD_DB", str(tmp_path / "ks.db"))
    monkeypatch.setattr(sqlite_repo, "AuthPolicy", lambda: FAST)
    assert CliRunner().invoke(main, ["init"]).exit_code == 0
    r = CliRunner().invoke(main, ["user", "add", "alice"], input=b"Okapi-9-long\r\n")
    assert r.exit_code == 1 and "carriage returns" in r.output, r.output
    r = CliRunner().invoke(main, ["user", "add", "alice"], input=b"Okapi-9-long\n")
    assert r.exit_code == 0, r.output


def _typed(argv: list[str], *lines: bytes, timeout: float = 60) -> tuple[int, str]:
    """Run `vmshield ARGV` on a terminal of its own, typing each of `lines` at a new prompt."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: the pty is its controlling terminal (/dev/tty)
        os.execv(sys.executable, [sys.executable, "-c", "from keystore.cli import main; main()",
                                  *argv])  # fmt: skip
    out, todo, deadline = b"", list(lines), time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if todo and out.count(b"assphrase:") > len(lines) - len(todo):
                os.write(fd, todo.pop(0))
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # EIO: the child closed the terminal
                    break
                if not chunk:
                    break
                out += chunk
    finally:
        os.close(fd)
        _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), out.decode(errors="replace")


#: the cases a terminal can carry as typed (it turns a CR into a newline, a NUL is no key)
TYPED = [c for c in LINE if c[0] in ("over", "exact")]


def _said(output: str) -> str:
    return "\n".join(x for x in output.splitlines() if x.strip() and "assphrase:" not in x) + "\n"


@pytest.mark.parametrize(("case", "given", "result"), TYPED, ids=[c for c, _, _ in TYPED])
def test_cli_prompt_on_a_terminal(image: Path, case: str, given: bytes, result: object) -> None:
    code, output = _typed(["image", "test-passphrase", str(image)], given)
    _check_cli(code, _said(output), given, result)


def test_an_empty_line_at_the_prompt_is_not_taken_the_prompt_asks_again(image: Path) -> None:
    exact = b"l" * MAX_LINE
    code, output = _typed(["image", "test-passphrase", str(image)], b"\n", exact + b"\n")
    assert output.count("Passphrase:") == 2, output
    _check_cli(code, _said(output), exact, exact)
