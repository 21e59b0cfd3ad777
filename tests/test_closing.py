"""`with` hands back the resource itself and closes it, on an error too."""

from __future__ import annotations

import pytest

from ramcli.closing import Closing


class Resource(Closing):
    def __init__(self):
        self.closed = 0

    def close(self) -> None:
        self.closed += 1


def test_with_gives_the_resource_and_closes_it_once():
    with Resource() as r:
        assert isinstance(r, Resource) and r.closed == 0
    assert r.closed == 1


def test_an_error_in_the_block_still_closes_and_propagates():
    r = Resource()
    with pytest.raises(KeyError), r:
        raise KeyError("x")
    assert r.closed == 1


def test_a_resource_must_say_how_it_closes():
    class Unclosable(Closing):
        pass

    with pytest.raises(TypeError):
        Unclosable()
