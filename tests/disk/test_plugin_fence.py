"""The lease's fence in the plugin (nbd_plugin/serve/fence.py), without nbdkit: requests go on
while the holder keeps its end of the pipe, and stop for good once it is closed. The end to
end case (a SIGKILLed holder, real nbdkit and PostgreSQL) is in
tests/keystore/test_postgres_lease.py."""

from __future__ import annotations

import os

import pytest

from nbd_plugin.errors import Fenced
from nbd_plugin.serve.config import ConfigError, ServerConfig
from nbd_plugin.serve.fence import Fence


def test_fence_holds_while_the_holder_keeps_its_end_and_trips_for_good_when_it_closes() -> None:
    r, w = os.pipe()
    try:
        fence = Fence(r)
        for _ in range(3):
            fence.check()
        os.close(w)
        w = -1
        with pytest.raises(Fenced, match="lease is gone"):
            fence.check()
        assert fence.fenced
        with pytest.raises(Fenced):  # and stays tripped
            fence.check()
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


@pytest.mark.parametrize("value", ["3", "-", "-x", "+/etc/passwd", "-999999"])
def test_a_bad_fence_parameter_is_one_clear_line(value: str) -> None:
    """Not a pipe's descriptor: refused at startup, rather than a server fenced from the
    first request (poll reports POLLNVAL on a closed descriptor)."""
    with pytest.raises(ConfigError) as e:
        ServerConfig().set("fence", value)
    assert str(e.value).startswith(f"fence={value}:")
    assert "\n" not in str(e.value)
