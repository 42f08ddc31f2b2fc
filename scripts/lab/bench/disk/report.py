"""Best-of-N numbers, ratios, the printed table and the JSON document."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scripts.lab.bench.disk.measure import Sample
from scripts.lab.bench.disk.servers import FLOOR, FLOORS, RATIO_TO, SUBJECT, SUBJECTS, Server

GIB = 1 << 30
DIRECTIONS = ("read", "write")
QEMU_DIRECTIONS = ("qemu read", "qemu write")
"""Samples of ``qemu-img bench -d 16`` through QEMU's NBD client."""
KIB, MIB = 1 << 10, 1 << 20
STARTUP_AT_MOST = 1.5
"""Seconds from server start to the first 4 KiB read back, at the cheap KDF (issue 13)."""


@dataclass(frozen=True)
class Target:
    """``subject``'s ratio to a peer must reach ``at_least`` (issues 13 and 25)."""

    peer: str
    direction: str
    request_size: int
    at_least: float
    efficiency: bool = False  # MB per CPU-second instead of MB/s
    subject: str = SUBJECT
    issue: int = 13

    def label(self) -> str:
        what = "MB per CPU-s" if self.efficiency else "MB/s"
        who = "" if self.subject == SUBJECT else f"{self.subject}: "
        return f"{who}{size_label(self.request_size)} {self.direction}, {what} vs {self.peer}"


TARGETS = [
    # issue 13: against the C peers
    *(Target("luks", d, rs, 2.0) for rs in (64 * KIB, MIB) for d in DIRECTIONS),
    *(Target("file", d, rs, 0.8) for rs in (64 * KIB, MIB) for d in QEMU_DIRECTIONS),
    # issue 25: within 10 % of the fastest plaintext Python plugin everywhere, LUKS1 and LUKS2,
    # through nbdcopy and through QEMU; LUKS2 through QEMU against the C file plugin and filter
    *(
        Target("floor", d, rs, 0.9, subject=who, issue=25)
        for who in SUBJECTS
        for rs in (4 * KIB, 64 * KIB, MIB)
        for d in (*DIRECTIONS, *QEMU_DIRECTIONS)
    ),
    *(Target("file", d, MIB, 0.6, subject="vmshield-luks2", issue=25) for d in QEMU_DIRECTIONS),
    *(
        Target("luks", d, 64 * KIB, 1.5, subject="vmshield-luks2", issue=25)
        for d in QEMU_DIRECTIONS
    ),
]


def size_label(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


@dataclass
class Row:
    """Every sample of one server; best-of-N summaries."""

    server: Server
    samples: dict[tuple[str, int], list[Sample]] = field(default_factory=dict)
    peak_rss_kib: int = 0
    memory_kib: dict[str, int] = field(default_factory=dict)  # rss, pss, private (max)
    unlock_s: float | None = None
    reconnect_s: float | None = None
    startup_s: float | None = None  # start to first connection, cheap KDF (best run)

    def add(self, direction: str, request_size: int, sample: Sample) -> None:
        self.samples.setdefault((direction, request_size), []).append(sample)

    def add_memory(self, memory: dict[str, int]) -> None:
        for k, v in memory.items():
            self.memory_kib[k] = max(self.memory_kib.get(k, 0), v)

    def best(self, direction: str, request_size: int) -> Sample | None:
        runs = self.samples.get((direction, request_size))
        return min(runs, key=lambda s: s.seconds) if runs else None


@dataclass
class Report:
    size: int  # bytes copied per run
    request_sizes: list[int]
    runs: int
    rows: list[Row]
    machine: dict[str, Any]
    qemu_sizes: list[int] = field(default_factory=list)
    qemu_bytes: int = 0  # bytes per qemu-img bench run

    def row(self, key: str) -> Row | None:
        return next((r for r in self.rows if r.server.key == key), None)

    def _bytes(self, direction: str) -> int:
        return self.qemu_bytes if direction in QEMU_DIRECTIONS else self.size

    def mbps(self, row: Row, direction: str, rs: int) -> float | None:
        best = row.best(direction, rs)
        return self._bytes(direction) / 1e6 / best.seconds if best else None

    def cpu_per_gib(self, row: Row, direction: str, rs: int) -> float | None:
        best = row.best(direction, rs)
        return best.cpu * GIB / self._bytes(direction) if best else None

    def efficiency(self, row: Row, direction: str, rs: int) -> float | None:
        """MB moved per CPU-second of the server."""
        best = row.best(direction, rs)
        return self._bytes(direction) / 1e6 / best.cpu if best and best.cpu > 0 else None

    def peer(self, other: str, direction: str, rs: int, *, cpu: bool = False) -> Row | None:
        """The row to compare with: ``other``'s, or for the floor the fastest (most MB per
        CPU-second with ``cpu``) of the floor's thread models in this column."""
        if other != FLOOR:
            return self.row(other)
        measure = self.efficiency if cpu else self.mbps
        scored = [
            (v, r) for r in self.rows if r.server.key in FLOORS
            if (v := measure(r, direction, rs)) is not None
        ]  # fmt: skip
        return max(scored, key=lambda vr: vr[0])[1] if scored else self.row(FLOOR)

    def ratio(
        self, other: str, direction: str, rs: int, *, cpu: bool = False, subject_key: str = SUBJECT
    ) -> float | None:
        subject, peer = self.row(subject_key), self.peer(other, direction, rs, cpu=cpu)
        if subject is None or peer is None:
            return None
        measure = self.efficiency if cpu else self.mbps
        a, b = measure(subject, direction, rs), measure(peer, direction, rs)
        return a / b if a is not None and b else None

    def floor_models(self, cols: list[tuple[str, int]]) -> list[str]:
        """Per column, the floor row the ratios use (its thread model)."""
        out = []
        for d, rs in cols:
            row = self.peer(FLOOR, d, rs)
            out.append(row.server.key if row is not None else "—")
        return out

    def targets(self) -> list[tuple[Target, float | None, bool]]:
        """Each target whose request size was run: (target, measured ratio, met)."""
        out = []
        for t in TARGETS:
            sizes = self.qemu_sizes if t.direction in QEMU_DIRECTIONS else self.request_sizes
            if t.request_size in sizes:
                m = self.ratio(t.peer, t.direction, t.request_size, cpu=t.efficiency,
                               subject_key=t.subject)  # fmt: skip
                out.append((t, m, m is not None and m >= t.at_least))
        return out

    def startup_met(self) -> bool | None:
        """Whether the subject's best start-to-first-byte is within STARTUP_AT_MOST."""
        row = self.row(SUBJECT)
        if row is None or row.startup_s is None:
            return None
        return row.startup_s <= STARTUP_AT_MOST

    def columns(self) -> list[tuple[str, int]]:
        return [(d, rs) for rs in self.request_sizes for d in DIRECTIONS]

    def qemu_columns(self) -> list[tuple[str, int]]:
        return [(d, rs) for rs in self.qemu_sizes for d in QEMU_DIRECTIONS]

    def to_json(self) -> dict[str, Any]:
        def per_column(fn: Any) -> dict[str, Any]:
            cols = self.columns() + self.qemu_columns()
            return {f"{size_label(rs)} {d}": fn(d, rs) for d, rs in cols}

        rows = {}
        for r in self.rows:
            rows[r.server.key] = {
                "label": r.server.label,
                "mb_per_s": per_column(lambda d, rs, r=r: self.mbps(r, d, rs)),
                "cpu_s_per_gib": per_column(lambda d, rs, r=r: self.cpu_per_gib(r, d, rs)),
                "mb_per_cpu_s": per_column(lambda d, rs, r=r: self.efficiency(r, d, rs)),
                "seconds": {
                    f"{size_label(rs)} {d}": [s.seconds for s in runs]
                    for (d, rs), runs in r.samples.items()
                },
                "peak_rss_kib": r.peak_rss_kib,
                "memory_kib": r.memory_kib,
                "unlock_s": r.unlock_s,
                "reconnect_s": r.reconnect_s,
                "startup_s": r.startup_s,
            }
        ratios = {
            f"{who}/{other}": per_column(
                lambda d, rs, o=other, w=who: self.ratio(o, d, rs, subject_key=w)
            )
            for who in SUBJECTS
            for other in (*RATIO_TO, "file")
        }
        ratios["floor row"] = per_column(
            lambda d, rs: p.server.key if (p := self.peer(FLOOR, d, rs)) else None
        )
        ratios[f"{SUBJECT}/luks efficiency"] = per_column(
            lambda d, rs: self.ratio("luks", d, rs, cpu=True)
        )
        targets = [
            {"target": t.label(), "at_least": t.at_least, "measured": m, "met": ok}
            for t, m, ok in self.targets()
        ]
        startup = self.row(SUBJECT)
        targets.append(
            {
                "target": f"{SUBJECT} start to first byte, s",
                "at_most": STARTUP_AT_MOST,
                "measured": startup.startup_s if startup else None,
                "met": self.startup_met(),
            }
        )
        return {
            "machine": self.machine,
            "targets": targets,
            "bytes_per_run": self.size,
            "bytes_per_qemu_run": self.qemu_bytes,
            "runs": self.runs,
            "mb": "10^6 bytes",
            "rows": rows,
            "ratios": ratios,
        }

    def _ratio_lines(self, cols: list[tuple[str, int]], others: tuple[str, ...], line: Any
                     ) -> list[str]:  # fmt: skip
        """A bold ratio line per subject (LUKS1, LUKS2) and peer that both ran."""
        out = []
        for who in SUBJECTS:
            for other in others:
                if self.row(other) and self.row(who):
                    vals = [self.ratio(other, d, rs, subject_key=who) for d, rs in cols]
                    if any(v is not None for v in vals):
                        out.append(line(f"**{who} / {other}**", vals, ".2f"))
        return out

    def markdown(self) -> str:
        def header(cols: list[tuple[str, int]]) -> list[str]:
            names = " | ".join(f"{size_label(rs)} {d}" for d, rs in cols)
            return [f"| | {names} |", "|---|" + "---:|" * len(cols)]

        def line(name: str, values: list[float | None], fmt: str) -> str:
            cells = ["—" if v is None else format(v, fmt) for v in values]
            return f"| {name} | " + " | ".join(cells) + " |"

        cols = self.columns()
        out = [f"MB/s (best of {self.runs}, {self.size >> 20} MiB per run)", "", *header(cols)]
        for r in self.rows:
            out.append(line(r.server.label, [self.mbps(r, d, rs) for d, rs in cols], ".0f"))
        out += self._ratio_lines(cols, RATIO_TO, line)
        if self.row(FLOOR):
            models = " | ".join(self.floor_models(cols))
            out.append(f"| floor = the fastest of | {models} |")
        out += ["", "Server CPU seconds per GiB (same runs)", "", *header(cols)]
        for r in self.rows:
            out.append(line(r.server.label, [self.cpu_per_gib(r, d, rs) for d, rs in cols], ".2f"))
        if self.row("luks") and self.row(SUBJECT):
            vals = [self.ratio("luks", d, rs, cpu=True) for d, rs in cols]
            out.append(line(f"**{SUBJECT} / luks, MB per CPU-second**", vals, ".2f"))
        qcols = self.qemu_columns()
        if qcols:
            out += [
                "",
                f"Through QEMU's NBD client: qemu-img bench -d 16, MB/s ({self.qemu_bytes >> 20} "
                "MiB per run, qemu-img's start and connect taken off)",
                "",
                *header(qcols),
            ]
            for r in self.rows:
                vals = [self.mbps(r, d, rs) for d, rs in qcols]
                if any(v is not None for v in vals):
                    out.append(line(r.server.label, vals, ".0f"))
            out += self._ratio_lines(qcols, ("file", FLOOR, "luks"), line)
        out += [
            "",
            "Start: server start to the first 4 KiB read back, at the benchmark image's 1000",
            "PBKDF2 iterations (best run); unlock: the same at cryptsetup's default cost.",
            "Memory after the runs, from /proc/PID/smaps (largest of the runs); private",
            "(Private_Clean + Private_Dirty) is what one more such server costs. RSS, PSS and",
            "private leave out the image's pages that vmshield maps to decrypt from (the",
            "kernel's cache of the image, reclaimable, filled as much by a pread): column",
            '"image pages" (peak RSS counts them).',
            "",
            "| server | start (s) | unlock (s) | reconnect (s) | RSS (MiB) | PSS (MiB) "
            "| private (MiB) | image pages (MiB) | peak RSS (MiB) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]

        def sec(v: float | None) -> str:
            return "—" if v is None else f"{v:.2f}"

        def mib(r: Row, key: str) -> str:
            v = r.memory_kib.get(key)
            return "—" if v is None else f"{v / 1024:.0f}"

        for r in self.rows:
            out.append(
                f"| {r.server.label} | {sec(r.startup_s)} | {sec(r.unlock_s)} | "
                f"{sec(r.reconnect_s)} | {mib(r, 'rss')} | {mib(r, 'pss')} | "
                f"{mib(r, 'private')} | {mib(r, 'image')} | {r.peak_rss_kib / 1024:.0f} |"
            )
        checks = self.targets()
        out += [
            "",
            f"| target ({SUBJECT} / peer unless named) | at least | measured | met |",
            "|---|---:|---:|---|",
        ]
        for t, m, ok in checks:
            shown = "—" if m is None else f"{m:.2f}"
            out.append(f"| {t.label()} | {t.at_least:.2f} | {shown} | {'yes' if ok else 'NO'} |")
        if checks:
            count = sum(ok for _, _, ok in checks)
            out.append(f"| targets met | | {count} of {len(checks)} | |")
        row = self.row(SUBJECT)
        if row is not None and row.startup_s is not None:
            met = "yes" if self.startup_met() else "NO"
            out.append(
                f"| start to first byte, s | at most {STARTUP_AT_MOST:.2f} | {row.startup_s:.2f} | "
                f"{met} |"
            )
        return "\n".join(out)
