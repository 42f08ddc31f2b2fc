"""The demo's USB-guest step: a guest kernel mounts the stick through usbgate, then loses it.

The thesis's experiment 6.3 on this host: Debian's generic kernel (xhci, usb-storage, sd, ext4;
`scripts/build-guest --variant usb`) under TCG, `usbgate run` for the demo's VM, and
`usbgate simulate-stick` serving an ext2 image (this host has no USB hardware: the stick's
owner is the one simulated part). The guest mounts the stick, checks a file's SHA-256 and
writes one back; then, while it reads, `vmshield usb block` revokes the stick and the guest's
kernel logs the disconnect and its reads fail.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time

from scripts.lab.demo.support import BIN, Host, Report, StepFailed
from scripts.lab.usb_rig import UsbRig, make_stick_image, read_stick_file

STICK_ID = "0781:5567"
NOTE = b"This is a test for USB redirection through usbgate!\n" * 2000


def step_usb_guest(host: Host, r: Report, vm: str) -> None:
    """Mount, verify, write back; revoke while reading; print the latency."""
    workdir = host.path("usb")
    workdir.mkdir()
    listed = json.loads(host.vmshield("usb", "list", vm, "--json", show=False).stdout)
    for _ in listed:  # the rules left by the previous step: start from a clean list
        host.vmshield("usb", "remove", vm, "1", show=False)
    host.vmshield("usb", "allow", vm, STICK_ID)
    image = make_stick_image(workdir / "stick.img", {"thesis.txt": NOTE})
    want = hashlib.sha256(NOTE).hexdigest()
    print(f"  stick image: ext2 with thesis.txt ({len(NOTE)} bytes, sha256 {want[:16]}...)")

    rig = UsbRig(workdir, db=host.db, vm=vm)
    host.cleanups.append(rig.stop)
    print("  booting the USB guest (generic kernel + xhci, usb-storage, sd, ext4; TCG) ...")
    started = time.monotonic()
    rig.start()
    r.check(True, f"guest up in {time.monotonic() - started:.1f} s; usbgate run --vm {vm} "
            "listens for owners")  # fmt: skip
    r.command([str(BIN / "usbgate"), "simulate-stick", str(image), "--vid", "0781", "--pid",
               "5567", "--connect", rig.gateway_address])  # fmt: skip
    with rig.plug(image):
        res = rig.guest.run("wait_stick 30 && usb_devices && stick_copy thesis.txt "
                            "from-guest.txt 'written by the guest'", timeout=90)  # fmt: skip
        r.output("\n".join(f"guest: {line}" for line in res.output.splitlines()))
        r.check(f"VMSHIELD-SHA256: {want}" in res.output,
                "the guest mounted the stick; the SHA-256 of thesis.txt matches",
                fatal=True)  # fmt: skip
        written = read_stick_file(image, "from-guest.txt").decode(errors="replace").strip()
        r.check(written == "written by the guest",
                f"the guest's write is in the stick's image: {written!r}")  # fmt: skip

        rig.guest.send("read_until_fail")
        time.sleep(1.0)
        argv = [str(BIN / "vmshield"), "usb", "block", vm, STICK_ID, "--position", "1"]
        r.command(argv)
        block = subprocess.run(argv, env=host.env(), capture_output=True, text=True,
                               timeout=60, check=False)  # fmt: skip
        if block.returncode != 0:
            r.output(block.stderr + block.stdout)
            raise StepFailed(f"vmshield usb block exited {block.returncode}")
        committed = rig.last_rule_change()
        gone = rig.guest.wait_console("USB disconnect", committed - 1, timeout=20)
        reads = rig.guest.result(timeout=60)
    for _, line in rig.guest.console_since(committed - 1, "1-1"):
        r.output(f"guest kernel: {line}")
    r.check("VMSHIELD-READ-FAILED" in reads.output, "the guest's reads failed once the stick "
            "was revoked")  # fmt: skip
    latency = (gone - committed) * 1000
    print(f"  latency: rule committed -> the guest's kernel logs the disconnect: {latency:.1f} ms")
    r.check(latency < 1000, f"revocation reached the guest's kernel in {latency:.1f} ms")
    rig.stop()
