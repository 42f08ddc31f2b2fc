"""`scripts/bench erase`: overwrite throughput per pass against dd on the same target.

For each round and each overwrite method, dd (`bs=4M oflag=direct conv=notrunc`, the
reference) and then the method run on one fully allocated file; pass speeds come from the
certificate (each pass timed including its fdatasync). The ratio method/dd is taken per round
and its median reported. The crypto method is timed on a LUKS image of the same size (it
writes only the key material, so its time is not a throughput).

    python -m scripts.lab.bench.erase [--size MIB] [--rounds N] [--dir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

from nbd_plugin.erase.engine import EraseOptions, erase
from nbd_plugin.erase.methods import METHODS

MIB = 1 << 20
KEEP = EraseOptions(verify=False, discard=False, unlink=False, force=True)  # dd-filled target


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
    """Measure. Each method's erase runs right after a dd of the same target; the ratio of
    the two is taken per round and the median kept, which cancels most of the load swings of
    a shared machine. Best rates are reported too."""
    methods = [m for m in METHODS.values() if m.overwrites]
    with tempfile.TemporaryDirectory(dir=directory, prefix="vmshield-bench-") as tmp:
        target = os.path.join(tmp, "target.img")
        _allocate(target, size)
        dd_best = 0.0
        ratios: dict[str, list[float]] = {m.name: [] for m in methods}
        best: dict[str, list[float]] = {m.name: [0.0] * len(m.passes) for m in methods}
        for _ in range(rounds):
            for m in methods:
                dd = _dd(target, size)
                dd_best = max(dd_best, dd)
                cert = erase(target, m.name, KEEP)
                os.unlink(cert.path)
                passes = cert.data["passes"]
                rate = sum(p["written_bytes"] for p in passes) / sum(p["seconds"] for p in passes)
                ratios[m.name].append(rate / dd)
                for i, p in enumerate(passes):
                    best[m.name][i] = max(best[m.name][i], p["written_bytes"] / p["seconds"])
        crypto = _crypto_seconds(tmp, size)
    per_method: dict[str, Any] = {}
    for m in methods:
        per_method[m.name] = {
            "ratio_to_dd": statistics.median(ratios[m.name]),
            "ratios": [round(r, 3) for r in ratios[m.name]],
            "passes": [
                {"pattern": p.value, "best_bytes_per_second": r}
                for p, r in zip(m.passes, best[m.name], strict=True)
            ],
        }
    return {
        "size": size,
        "rounds": rounds,
        "dd_best_bytes_per_second": dd_best,
        "methods": per_method,
        "crypto_seconds": crypto,
    }


def _print(result: dict[str, Any]) -> None:
    print(
        f"target {result['size'] // MIB} MiB, {result['rounds']} rounds; ratio = median over "
        "rounds of (method's overwrite rate / dd's rate just before it)"
    )
    print(
        f"{'dd bs=4M oflag=direct':<22} best {result['dd_best_bytes_per_second'] / 1e6:6.0f} MB/s"
    )
    for name, m in result["methods"].items():
        rates = " ".join(
            f"{p['pattern']}:{p['best_bytes_per_second'] / 1e6:.0f}" for p in m["passes"]
        )
        print(f"{name:<22} ratio {m['ratio_to_dd']:.2f}   best MB/s per pass {rates}")
    crypto = result["crypto_seconds"]
    if crypto is not None:
        print(f"{'crypto (wipe+unlink)':<22} {crypto * 1000:.1f} ms")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `scripts/bench erase`."""
    parser = argparse.ArgumentParser(prog="bench erase", description=__doc__.split("\n\n")[1])
    parser.add_argument("--size", type=int, default=1024, help="target size in MiB (1024)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds, median kept (5)")
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
