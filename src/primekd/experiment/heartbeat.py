"""Call a function every few seconds while a block runs, in a daemon thread.

The runner uses it to keep a running stage's recorded time current, so a stage killed
mid-way (a session's end, an OOM kill) still counts the time it spent when the run resumes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress


@contextmanager
def every(seconds: float, beat: Callable[[], None]) -> Iterator[None]:
    """Run `beat()` every `seconds` until the block ends (not once more after it). An
    `OSError` from `beat` (a full disk) skips that beat; the block goes on."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(seconds):
            with suppress(OSError):
                beat()

    thread = threading.Thread(target=loop, name="primekd-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
