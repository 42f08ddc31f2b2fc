"""`scripts/bench erase`: overwrite throughput per pass against dd on the same target.

For each round, dd (`bs=4M oflag=direct conv=notrunc`, the reference) and every overwrite
method run side by side on one fully allocated file; per-pass speed comes from the certificate
(each pass timed including its fdatasync). The best of the rounds is reported, as a ratio to
dd's best. The crypto method is timed on a LUKS image of the same size (it writes only the key
material, so its time is not a throughput).

    python -m nbd_plugin.erase.bench [--size MIB] [--rounds N] [--dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Any

from nbd_plugin.erase.engine import EraseOptions, erase
from nbd_plugin.erase.methods import METHODS

MIB = 1 << 20
KEEP = EraseOptions(verify=False, discard=False, unlink=False)


def _dd(path: str, size: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(
        [
            "dd",
            "if=/dev/zero",
            f"of={path}",
            "bs=4M",
            f"count={size // (4 * MIB)}",
            "oflag=direct",
            "conv=notrunc",
            "status=none",
        ],
        check=True,
    )
    return size / (time.perf_counter() - t0)


def _allocate(path: str, size: int) -> None:
    with open(path, "wb") as f:
        chunk = os.urandom(4 * MIB)
        for _ in range(size // len(chunk)):
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())


def _crypto_seconds(directory: str, size: int) -> float | None:
    img = os.path.join(directory, "luks.img")
    key = os.path.join(directory, "key")
    with open(key, "wb") as f:
        f.write(b"bench")
    with open(img, "wb") as f:
        f.truncate(size)
    r = subprocess.run(
        [
            "cryptsetup",
            "luksFormat",
            "--type",
            "luks1",
            "--batch-mode",
            "--pbkdf-force-iterations",
            "1000",
            "--key-file",
            key,
            img,
        ],
        capture_output=True,
    )
    if r.returncode != 0:
        return None
    t0 = time.perf_counter()
    erase(img, "crypto")  # the full order: wipe, verify, punch hole, unlink
    return time.perf_counter() - t0


def run(size: int, rounds: int, directory: str) -> dict[str, Any]:
    """Measure; returns {"dd": bytes/s, "methods": {name: {...}}, ...}."""
    methods = [m for m in METHODS.values() if m.overwrites]
    with tempfile.TemporaryDirectory(dir=directory, prefix="vmshield-bench-") as tmp:
        target = os.path.join(tmp, "target.img")
        _allocate(target, size)
        dd_best = 0.0
        best: dict[str, list[float]] = {m.name: [0.0] * len(m.passes) for m in methods}
        for _ in range(rounds):
            for m in methods:
                dd_best = max(dd_best, _dd(target, size))
                cert = erase(target, m.name, KEEP)
                os.unlink(cert.path)
                for i, p in enumerate(cert.data["passes"]):
                    cert_rate = p["bytes"] / p["seconds"]
                    best[m.name][i] = max(best[m.name][i], cert_rate)
        crypto = _crypto_seconds(tmp, size)
    result: dict[str, Any] = {"size": size, "rounds": rounds, "dd_bytes_per_second": dd_best}
    per_method: dict[str, Any] = {}
    for m in methods:
        rates = best[m.name]
        per_method[m.name] = {
            "passes": [
                {"pattern": p.value, "bytes_per_second": r, "ratio_to_dd": r / dd_best}
                for p, r in zip(m.passes, rates, strict=True)
            ],
            "min_ratio_to_dd": min(rates) / dd_best,
        }
    result["methods"] = per_method
    result["crypto_seconds"] = crypto
    return result


def _print(result: dict[str, Any]) -> None:
    dd = result["dd_bytes_per_second"]
    print(f"target {result['size'] // MIB} MiB, best of {result['rounds']} rounds")
    print(f"{'dd bs=4M oflag=direct':<24} {dd / 1e6:8.0f} MB/s   1.00")
    for name, m in result["methods"].items():
        for i, p in enumerate(m["passes"], 1):
            label = f"{name} pass {i} ({p['pattern']})"
            print(f"{label:<24} {p['bytes_per_second'] / 1e6:8.0f} MB/s   {p['ratio_to_dd']:.2f}")
    crypto = result["crypto_seconds"]
    if crypto is not None:
        print(f"{'crypto (wipe+unlink)':<24} {crypto * 1000:8.1f} ms")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `scripts/bench erase`."""
    parser = argparse.ArgumentParser(prog="bench erase", description=__doc__.split("\n\n")[1])
    parser.add_argument("--size", type=int, default=1024, help="target size in MiB (1024)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, best one kept (3)")
    parser.add_argument("--dir", default="/var/tmp", help="where the target lives (/var/tmp)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_args(argv)
    size = args.size * MIB - (args.size * MIB) % (4 * MIB)
    if size <= 0:
        parser.error("--size must be at least 4 MiB")
    result = run(size, args.rounds, args.dir)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        _print(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
