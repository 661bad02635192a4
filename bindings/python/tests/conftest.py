"""Fixtures for the pyshmlock tests: a segment of each test's own, shmlockd with a gateway, the
project's binaries, and child Python processes (``child.py``).

The binaries come from ``$SHMLOCK_BIN_DIR``, else the project's ``target/debug`` (``cargo build
--bins`` makes them; ``.ci/run`` does).
"""

from __future__ import annotations

import itertools
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import pytest

import pyshmlock

REPO = Path(__file__).resolve().parents[3]
CHILD = Path(__file__).resolve().parent / "child.py"
DEADLINE = 30.0
_counter = itertools.count()


def wait_until(what: str, cond: Callable[[], bool], deadline: float = DEADLINE) -> None:
    """Polls `cond` until it holds; fails naming `what` after `deadline` seconds."""
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)


def binary(name: str) -> Path:
    """The path of one of the project's binaries (shmlockd, shmlock, shmlock-bench)."""
    d = Path(os.environ.get("SHMLOCK_BIN_DIR", REPO / "target" / "debug"))
    p = d / name
    if not p.exists():
        raise AssertionError(f"{p} is missing: build it with `cargo build --bins` (or set SHMLOCK_BIN_DIR)")
    return p


@pytest.fixture
def segment() -> Iterator[str]:
    """A segment name of this test's own; its file is removed afterwards."""
    name = f"/shmlock-pytest-{os.getpid()}-{next(_counter)}"
    yield name
    try:
        os.unlink(f"/dev/shm{name}")
    except FileNotFoundError:
        pass


@pytest.fixture
def client(segment: str) -> pyshmlock.Client:
    """A client of a fresh segment (created without shmlockd)."""
    return pyshmlock.Client(segment, create=True)


class Children:
    """Child Python processes running ``child.py ROLE ARGS...``; SIGKILLed at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: List[subprocess.Popen] = []

    def spawn(self, *args: object, env: Optional[dict] = None) -> subprocess.Popen:
        p = subprocess.Popen(
            [sys.executable, str(CHILD), *map(str, args)],
            env={**os.environ, **(env or {})},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.procs.append(p)
        return p

    def readline(self, p: subprocess.Popen, deadline: float = DEADLINE) -> str:
        """The next line `p` prints, failing after `deadline` seconds (a child that hangs fails
        the test instead of stalling it)."""
        ready, _, _ = select.select([p.stdout], [], [], deadline)
        if not ready:
            raise AssertionError(f"child {p.args} printed nothing for {deadline}s")
        return p.stdout.readline()

    def finish(self, p: subprocess.Popen, timeout: float = DEADLINE) -> str:
        """Waits for `p`; its stdout. Fails if it exits with an error."""
        out, err = p.communicate(timeout=timeout)
        assert p.returncode == 0, f"child {p.args} exited {p.returncode}:\n{out}\n{err}"
        return out

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


@pytest.fixture
def children(tmp_path: Path) -> Iterator[Children]:
    c = Children(tmp_path)
    yield c
    c.kill_all()


class Daemon:
    """shmlockd on a segment, with its gateway on a free loopback port."""

    def __init__(self, segment: str, tmp: Path) -> None:
        self.log = tmp / "shmlockd.log"
        self.proc = subprocess.Popen(
            [str(binary("shmlockd")), "--segment", segment, "--listen", "127.0.0.1:0", "--log-level", "info"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "w"),
        )
        self.addr = ""

        def ready() -> bool:
            assert self.proc.poll() is None, f"shmlockd exited:\n{self.log.read_text()}"
            m = re.search(r"gateway ready listen=(\S+)", self.log.read_text())
            if m:
                self.addr = m.group(1)
            return bool(self.addr)

        wait_until("shmlockd's gateway", ready)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def daemon(segment: str, tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(segment, tmp_path)
    yield d
    d.stop()
