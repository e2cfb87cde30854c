"""What a run shows while it works: a step bar, and a ticking timer for phases with no count.

Every phase that can take more than a couple of seconds (training the BPE tokenizer, tokenising,
the first compile, teacher continuations) runs inside `phase`, the loop inside `bar`. With
`enabled=False` nothing is drawn and tqdm (the `examples` extra) is never imported; `write` still
prints, since those lines are results, not progress.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator


class Plain:
    """A stand-in for a tqdm bar that draws nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, *args, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    @staticmethod
    def write(line: str) -> None:
        print(line, flush=True)


def bar(total: int, initial: int, enabled: bool, desc: str = "train"):
    """A tqdm bar over `total` steps starting at `initial`, or a silent stand-in."""
    if not enabled:
        return Plain()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)


def iterate(items, total: int, enabled: bool, desc: str):
    """`items` with a tqdm bar of `total` when enabled."""
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, total=total, desc=desc, dynamic_ncols=True)


@contextlib.contextmanager
def phase(desc: str, enabled: bool) -> Iterator[None]:
    """Shows `desc` with the seconds spent so far, redrawn twice a second from a thread (the work
    itself, e.g. a compile in C++, gives no count to report)."""
    if not enabled:
        yield
        return
    from tqdm.auto import tqdm

    timer = tqdm(desc=desc, bar_format="{desc}: {elapsed}", dynamic_ncols=True)
    done = threading.Event()

    def tick():
        while not done.wait(0.5):
            timer.refresh()

    thread = threading.Thread(target=tick, daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        timer.set_description_str(f"{desc} ({time.perf_counter() - start:.1f} s)")
        timer.close()
