"""The loader's copy-out thread: order, bounded read-ahead, errors where they belong, early stops."""

import gc
import threading
import time
import weakref

import pytest
from keyshard.errors import KeyshardError
from keyshard.train.copy_ahead import CopyAhead


def _counted(n, produced, fail_at=None, closed=None):
    try:
        for i in range(n):
            if i == fail_at:
                raise ValueError(f"bad item {i}")
            produced.append(threading.get_ident())
            yield i
    finally:
        if closed is not None:
            closed.set()


@pytest.mark.parametrize("depth", [1, 3])
def test_items_arrive_in_order_from_another_thread_at_most_depth_ahead(depth):
    produced = []
    got = []
    for i in CopyAhead(_counted(12, produced), depth):
        time.sleep(0.02)  # a slow caller: the producer fills the queue and waits
        got.append(i)
        assert len(produced) <= i + 1 + depth  # received i + 1; at most `depth` more exist

    assert got == list(range(12))
    assert set(produced) == {produced[0]} and produced[0] != threading.get_ident()


def test_an_error_while_producing_is_raised_to_the_caller_after_the_items_before_it():
    got = []
    with pytest.raises(ValueError, match="bad item 3"):
        for i in CopyAhead(_counted(10, [], fail_at=3)):
            got.append(i)
    assert got == [0, 1, 2]


def test_a_caller_that_stops_early_stops_the_thread_and_closes_the_source():
    produced, closed = [], threading.Event()
    ahead = CopyAhead(_counted(1000, produced, closed=closed), depth=2)
    items = iter(ahead)
    assert next(items) == 0
    items.close()  # what `break` or an exception in the caller's loop does
    ahead.join()
    assert closed.is_set() and len(produced) <= 1 + 2


def test_an_iterator_of_a_joined_instance_says_so_instead_of_waiting_for_ever():
    ahead = CopyAhead(iter(range(100)))
    items = iter(ahead)
    assert next(items) == 0
    ahead.join()  # what the loader does when the next epoch starts
    with pytest.raises(KeyshardError, match="started another epoch"):
        next(items)


def test_an_error_leaves_nothing_that_keeps_the_source_alive():
    """The exception handed over must not tie the caller's frame into a cycle: the loader the items
    come from (its workers, slots) is freed when the caller drops it, without the cycle collector."""

    class Source:
        def items(self):
            yield 1
            raise ValueError("bad shard")

    source = Source()
    alive = weakref.ref(source)
    gc.disable()
    try:
        ahead = CopyAhead(source.items())
        try:
            list(ahead)
        except ValueError:
            pass
        ahead.join()
        del ahead, source
        assert alive() is None
    finally:
        gc.enable()


def test_depth_below_one_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        CopyAhead(iter(()), depth=0)
