"""Child processes of the pyshmlock tests: ``python child.py ROLE SEGMENT ARGS...``.

Each role prints what the test reads on stdout (flushed at once) and exits 0 when all went as
expected; anything else is a failure the test reports with the child's stderr.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pyshmlock


def say(*words: object) -> None:
    print(*words, flush=True)


def wait_for_file(path: Path, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not path.exists():
        if time.monotonic() > end:
            raise SystemExit(f"no {path} after {deadline}s")
        time.sleep(0.002)


def counter(segment: str, name: str, witness: str, n: str, shared_every: str = "0") -> None:
    """Increments the number in `witness` `n` times under the lock, non-atomically: a second
    process inside at the same time would lose an increment."""
    c = pyshmlock.Client(segment)
    path = Path(witness)
    for i in range(int(n)):
        with c.lock(name, timeout=30.0) as g:
            assert g.mode == "exclusive"
            value = int(path.read_text() or "0")
            if i % 7 == 0:
                time.sleep(0.0005)  # widen the window a lost update needs
            path.write_text(str(value + 1))


def lock_counter(segment: str, name: str, witness: str, n: str) -> None:
    """`counter` through one reusable ``pyshmlock.Lock``, in its call form (acquire/release)."""
    lk = pyshmlock.Lock(pyshmlock.Client(segment), name, timeout=30.0)
    path = Path(witness)
    for i in range(int(n)):
        assert lk.acquire()
        value = int(path.read_text() or "0")
        if i % 7 == 0:
            time.sleep(0.0005)
        path.write_text(str(value + 1))
        lk.release()


def hold(segment: str, name: str, mode: str, ready: str, release: str) -> None:
    """Locks `name`, creates `ready` (with its token), and holds until `release` exists."""
    c = pyshmlock.Client(segment)
    g = c.lock(name, shared=(mode == "shared"))
    Path(ready).write_text(f"{g.token} {int(g.owner_died)}")
    wait_for_file(Path(release))
    g.release()


def interrupted_wait(segment: str, name: str, form: str = "client") -> None:
    """Waits for `name` (held by the test) until SIGINT, through ``Client.lock`` or (form
    "lock_object") a ``pyshmlock.Lock``; reports how long the interrupt took to arrive as
    KeyboardInterrupt, then stays alive (its client open) until stdin closes."""
    c = pyshmlock.Client(segment)
    lk = pyshmlock.Lock(c, name)
    say("waiting")
    try:
        if form == "lock_object":
            lk.acquire()
        else:
            c.lock(name)
        say("granted")
    except KeyboardInterrupt:
        say("interrupted", time.monotonic())
    sys.stdin.read()


def label(segment: str) -> None:
    """Opens a client (default label: this script's name) and waits for stdin to close."""
    c = pyshmlock.Client(segment)
    say("open", os.getpid())
    sys.stdin.read()
    del c


ROLES = {f.__name__: f for f in (counter, lock_counter, hold, interrupted_wait, label)}

if __name__ == "__main__":
    ROLES[sys.argv[1]](*sys.argv[2:])
