"""`vmshield disk bind` with the other clevis pins, real parts: sss over two real Tang servers
(one down is no outage, both down is) and tpm2 with swtpm as this host's TPM."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.keystore.test_clevis_unlock import (
    MARKER,
    image,
    ks,
    nothing_served,
    serve_unattended,
    sock,
    write_marker,
)
from tests.support.libvirt import Keystore
from tests.support.nbd import read_at
from tests.support.tang import tang_server
from tests.support.tpm import swtpm

__all__ = ["ks"]  # the keystore fixture, shared with test_clevis_unlock


def bind(ks: Keystore, *args: str) -> dict[str, object]:
    out = ks.cli("disk", "bind", ks.disk, *args, "--json", "--password-file", str(ks.pwfile))
    got: dict[str, object] = json.loads(out.stdout)
    return got


def test_sss_one_of_two_tang_servers(ks: Keystore) -> None:
    write_marker(ks)
    with tang_server(ks.base / "t1") as t1, tang_server(ks.base / "t2") as t2:
        bound = bind(ks, "sss", "--threshold", "1", "--url", t1.url, "--url", t2.url)
        assert bound["pins"] == f"sss 1 of [tang {t1.url}, tang {t2.url}]"
        assert len(bound["thumbprints"]) == 2  # type: ignore[arg-type]
        listed = subprocess.run(["clevis", "luks", "list", "-d", image(ks)], capture_output=True,
                                text=True, check=True).stdout  # fmt: skip
        assert listed.startswith(f"{bound['keyslot']}: sss '")
        t1.stop()  # one of two down: no outage
        assert "opened by network (sss 1 of" in serve_unattended(ks).stderr
        assert read_at(str(sock(ks)), len(MARKER), 1 << 20) == MARKER
        ks.cli("disk", "stop", ks.disk)
        t2.stop()  # both down: refused in one line naming both
        err = serve_unattended(ks, code=1).stderr.strip().splitlines()
        assert len(err) == 1 and t1.url in err[0] and t2.url in err[0], err
        assert nothing_served(ks)


def test_tpm2_binding_opens_on_this_tpm_only(ks: Keystore, monkeypatch: pytest.MonkeyPatch) -> None:
    write_marker(ks)
    with swtpm(ks.base / "tpm") as tcti:
        monkeypatch.setenv("TPM2TOOLS_TCTI", tcti)
        bound = bind(ks, "tpm2", "--pcr-ids", "7")
        assert bound["pins"] == "tpm2" and bound["thumbprints"] == []
        assert "opened by network (tpm2)" in serve_unattended(ks).stderr
        assert read_at(str(sock(ks)), len(MARKER), 1 << 20) == MARKER
        ks.cli("disk", "stop", ks.disk)
    with swtpm(ks.base / "other-tpm") as tcti:  # another machine's TPM cannot unseal it
        monkeypatch.setenv("TPM2TOOLS_TCTI", tcti)
        err = serve_unattended(ks, code=1).stderr.strip().splitlines()
        assert len(err) == 1 and "clevis token 0 (tpm2)" in err[0], err
        assert nothing_served(ks)


@pytest.mark.parametrize(
    "args",
    [
        ("tang",),
        ("tang", "--url", "http://a", "--url", "http://b"),
        ("tpm2", "--url", "http://a"),
        ("sss", "--url", "http://a"),
        ("sss", "--url", "http://a", "--threshold", "2"),
        ("tang", "--url", "ftp://a"),
    ],
)
def test_bad_bind_arguments_one_line_nothing_written(ks: Keystore, args: tuple[str, ...]) -> None:
    before = subprocess.run(["cryptsetup", "luksDump", image(ks)], capture_output=True).stdout
    p = ks.cli("disk", "bind", ks.disk, *args, "--password-file", str(ks.pwfile), code=1)
    assert len(p.stderr.strip().splitlines()) == 1 and "Traceback" not in p.stderr, p.stderr
    assert (
        subprocess.run(["cryptsetup", "luksDump", image(ks)], capture_output=True).stdout == before
    )
