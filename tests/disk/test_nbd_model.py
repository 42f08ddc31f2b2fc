"""A random workload over a real NBD connection agrees with an in-memory model.

Reads must return exactly what the model holds; trimmed bytes are unspecified by NBD, so the
model forgets them until they are written again.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbd_plugin import luks
from tests.support.nbd import SECRET, connect, serve_plugin

SIZE = (1 << 20) + 3 * 512  # not a power of two: the tail matters

offsets = st.integers(0, SIZE - 1)
lengths = st.integers(1, 70_000)
op = st.one_of(
    st.tuples(st.just("write"), offsets, lengths, st.integers(0, 255), st.booleans()),
    st.tuples(st.just("zero"), offsets, lengths, st.booleans(), st.booleans()),
    st.tuples(st.just("trim"), offsets, lengths, st.just(0), st.just(False)),
    st.tuples(st.just("read"), offsets, lengths, st.just(0), st.just(False)),
    st.tuples(st.just("flush"), st.just(0), st.just(0), st.just(0), st.just(False)),
)


class Model:
    def __init__(self) -> None:
        self.data = bytearray(SIZE)
        self.known = bytearray(b"\1" * SIZE)

    def check(self, offset: int, got: bytes) -> None:
        want = self.data[offset : offset + len(got)]
        mask = self.known[offset : offset + len(got)]
        for i, (a, b, k) in enumerate(zip(got, want, mask, strict=True)):
            if k and a != b:
                raise AssertionError(f"byte {offset + i}: read {a:#x}, model has {b:#x}")


@pytest.fixture(scope="module", params=["ignore", "unmap"])
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    import shutil
    import tempfile

    from tests.support.nbd import write_secret

    work = tmp_path_factory.mktemp("model")
    image, key = work / "m.img", work / "key"
    write_secret(key, SECRET)
    luks.create_image(str(image), SIZE, SECRET, iterations=1000)
    sockdir = Path(tempfile.mkdtemp(prefix="vmm", dir="/tmp"))
    try:
        with serve_plugin(image, key, sockdir, f"discard={request.param}") as sock:
            yield sock
    finally:
        shutil.rmtree(sockdir, ignore_errors=True)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(ops=st.lists(op, min_size=1, max_size=25))
def test_random_workload_matches_model(
    server: str, ops: list[tuple[str, int, int, int, bool]]
) -> None:
    import nbd

    model = Model()
    with connect(server) as h:
        h.zero(SIZE, 0)  # type: ignore[attr-defined]
        for name, offset, length, arg, flag in ops:
            length = min(length, SIZE - offset)
            if name == "write":
                data = bytes([(arg + i) & 0xFF for i in range(251)]) * (length // 251 + 1)
                data = data[:length]
                h.pwrite(data, offset, nbd.CMD_FLAG_FUA if flag else 0)  # type: ignore[attr-defined]
                model.data[offset : offset + length] = data
                model.known[offset : offset + length] = b"\1" * length
            elif name == "zero":
                flags = 0 if arg else nbd.CMD_FLAG_NO_HOLE
                h.zero(length, offset, flags)  # type: ignore[attr-defined]
                model.data[offset : offset + length] = bytes(length)
                model.known[offset : offset + length] = b"\1" * length
            elif name == "trim":
                if h.can_trim():  # type: ignore[attr-defined]
                    h.trim(length, offset)  # type: ignore[attr-defined]
                    model.known[offset : offset + length] = bytes(length)
            elif name == "read":
                model.check(offset, h.pread(length, offset))  # type: ignore[attr-defined]
            else:
                h.flush()  # type: ignore[attr-defined]
        model.check(0, h.pread(SIZE, 0))  # type: ignore[attr-defined]
