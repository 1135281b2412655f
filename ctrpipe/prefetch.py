"""Shared by the shard build and the loader: run an iterator on one background thread, a bounded number of
items ahead of the consumer.

The heavy steps (file reads, the compiled Criteo kernel, polars, numpy copies and gathers) release the GIL, so
one thread overlaps producing with consuming. Errors raised in the thread are re-raised in the consumer; a
consumer that stops early (`break`, `close()`, garbage collection) stops and joins the thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

_POLL_S = 0.1  # how often a blocked put/get looks at the stop flag / the thread's liveness


@dataclass
class _Failure:
    exc: BaseException


class _Done:
    pass


@dataclass
class _Item(Generic[T]):
    value: T


def _put(q: queue.Queue, item: object, stop: threading.Event) -> bool:
    """Put unless the consumer has gone; False means stop producing."""
    while not stop.is_set():
        try:
            q.put(item, timeout=_POLL_S)
            return True
        except queue.Full:
            continue
    return False


def prefetch(make: Callable[[], Iterable[T]], depth: int, name: str) -> Iterator[T]:
    """Yield the items of `make()`, produced on a thread named `name` at most `depth` items ahead."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for value in make():
                if stop.is_set() or not _put(q, _Item(value), stop):
                    return
            _put(q, _Done(), stop)
        except BaseException as exc:  # noqa: BLE001 - every failure must reach the consumer, not die silently
            _put(q, _Failure(exc), stop)

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = q.get(timeout=_POLL_S)
            except queue.Empty:
                if not thread.is_alive() and q.empty():
                    raise RuntimeError(f"the {name} thread ended without a result (bug in ctrpipe)") from None
                continue
            if isinstance(item, _Done):
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item.value
    finally:
        stop.set()
        thread.join()
