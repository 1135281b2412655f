"""Stage 1-2: run an iterator in a background thread, so reading, parsing and transforming overlap.

Useful because the heavy steps (file reads, the compiled kernel, polars, numpy) release the GIL.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

T = TypeVar("T")


def prefetch(make: Callable[[], Iterator[T]], depth: int = 1, name: str = "ctrpipe-prefetch") -> Iterator[T]:
    """Items of `make()`, produced `depth` ahead in a thread; worker errors re-raise here."""
    q: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: tuple[str, Any]) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for item in make():
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer thread, which re-raises it
            put(("error", exc))

    thread = threading.Thread(target=work, name=name, daemon=True)
    thread.start()
    try:
        while True:
            kind, value = q.get()
            if kind == "item":
                yield value
            elif kind == "end":
                return
            else:
                raise value
    finally:
        stop.set()
        thread.join(timeout=30)
