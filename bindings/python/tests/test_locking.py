"""pyshmlock as Python users rely on it, with real processes: exclusion with a witness outside
the lock, shared mode, timeouts naming the holder, try-lock, owner-died after kill -9, Ctrl-C
during a wait, fork and spawn under multiprocessing, the CLI's view of Python owners, and the
same API through the gateway."""

from __future__ import annotations

import inspect
import json
import multiprocessing
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

import pyshmlock
from conftest import DEADLINE, Children, Daemon, binary, wait_until


# ---- exclusion, shared mode, timeouts ---------------------------------------------------------


@pytest.mark.parametrize("role", ["counter", "lock_counter"])  # client.lock's Guard; a reused Lock
def test_exclusive_locks_exclude_across_processes(
    segment: str, client: pyshmlock.Client, children: Children, tmp_path: Path, role: str
) -> None:
    witness = tmp_path / "counter"
    witness.write_text("0")
    n, per = 4, 300
    procs = [children.spawn(role, segment, "jobs/1", witness, per) for _ in range(n)]
    for p in procs:
        children.finish(p)
    assert int(witness.read_text()) == n * per, "an increment was lost: two holders at once"
    assert client.try_lock("jobs/1") is not None


def test_a_lock_object_is_reusable_and_reports_its_last_grant(segment: str, client: pyshmlock.Client) -> None:
    other = pyshmlock.Client(segment)
    lk = pyshmlock.Lock(client, "reused")
    assert (lk.name, lk.mode, lk.locked, lk.token, lk.timeout, lk.client) == ("reused", "exclusive", False, 0, None, client)
    assert lk.acquire() is True
    first = lk.token
    assert first > 0 and lk.locked and not lk.owner_died and not lk.lost
    assert other.try_lock("reused") is None, "a Lock's acquire is the client's lock"
    with pytest.raises(pyshmlock.AlreadyHeld):
        lk.acquire()
    with pytest.raises(pyshmlock.AlreadyHeld):
        client.lock("reused")
    assert lk.locked, "a refused second acquire keeps the first"
    lk.release()
    assert not lk.locked and lk.token == first
    with pytest.raises(pyshmlock.NotHeld):
        lk.release()
    # `with` returns the Lock itself; each grant's token is newer.
    with lk as same:
        assert same is lk and lk.locked and lk.token > first
    assert not lk.locked and other.try_lock("reused") is not None
    # Released inside the block: the block's end is fine.
    with lk:
        lk.release()
    # A lock taken away meanwhile raises NotHeld at release, and at the end of a with block,
    # unless the block raises already (its exception goes on).
    lk.acquire()
    client.unlock("reused")
    with pytest.raises(pyshmlock.NotHeld):
        lk.release()
    with pytest.raises(pyshmlock.NotHeld):
        with lk:
            client.unlock("reused")
    with pytest.raises(ZeroDivisionError):
        with lk:
            client.unlock("reused")
            1 / 0
    assert not lk.locked and lk.__exit__(None, None, None) is False
    with pytest.raises(TypeError):
        lk.__exit__(None, None, None, None)  # type: ignore[call-arg]
    with pytest.raises(ZeroDivisionError):
        with lk:
            1 / 0
    assert not lk.locked, "a block that raises still unlocks"
    # Two Lock objects on one name and one client are one owner: the second is refused.
    lk.acquire()
    with pytest.raises(pyshmlock.AlreadyHeld):
        pyshmlock.Lock(client, "reused").acquire()
    lk.release()
    assert "reused" in repr(lk) and "not held" in repr(lk)


def test_a_busy_lock_object_gives_false_timeout_or_wouldblock(segment: str, client: pyshmlock.Client) -> None:
    other = pyshmlock.Client(segment)
    g = other.lock(b"busy\x00")
    lk = pyshmlock.Lock(client, b"busy\x00", timeout=0.1)
    assert lk.acquire(blocking=False) is False and not lk.locked
    assert lk.acquire(timeout=0) is False
    with pytest.raises(pyshmlock.Timeout) as e:
        lk.acquire()  # its own timeout, 0.1 s
    assert e.value.holder_pid == os.getpid() and e.value.name == b"busy\x00"
    with pytest.raises(pyshmlock.Timeout):
        with lk:
            pass
    with pytest.raises(pyshmlock.WouldBlock):
        with pyshmlock.Lock(client, b"busy\x00", timeout=0):
            pass
    g.release()
    assert lk.acquire(timeout=-1) and lk.name == b"busy\x00"
    lk.release()
    # Shared Lock objects share.
    r1, r2 = pyshmlock.Lock(client, "cfg", shared=True), pyshmlock.Lock(other, "cfg", shared=True)
    assert r1.acquire() and r2.acquire(blocking=False) and r1.mode == "shared"
    assert pyshmlock.Lock(pyshmlock.Client(segment), "cfg").acquire(blocking=False) is False
    r1.release()
    r2.release()


def test_a_lock_object_checks_its_arguments(client: pyshmlock.Client) -> None:
    with pytest.raises(TypeError):
        pyshmlock.Lock("not a client", "n")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pyshmlock.Lock(client, 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        pyshmlock.Lock(client, "n", timeout=float("nan"))
    with pytest.raises(pyshmlock.BadName):
        pyshmlock.Lock(client, "").acquire()
    with pytest.raises(pyshmlock.BadName):
        pyshmlock.Lock(client, "x" * 10_000).acquire()
    # acquire and release are methods of CPython's own kind (a fast path written in the module):
    # they check self, their arguments and the class the way any method does.
    lk = pyshmlock.Lock(client, "checked")
    with pytest.raises(TypeError):
        pyshmlock.Lock.acquire(client)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        pyshmlock.Lock.release(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        lk.acquire(True, 1.0, 3)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        lk.acquire(wait=1.0)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        lk.release(1)  # type: ignore[call-arg]
    assert not lk.locked, "a refused call takes nothing"
    with pytest.raises(TypeError):

        class Sub(pyshmlock.Lock):  # type: ignore[misc]
            pass

    assert list(inspect.signature(pyshmlock.Lock.acquire).parameters) == ["self", "blocking", "timeout"]
    assert "Timeout" in (pyshmlock.Lock.acquire.__doc__ or "")
    assert lk.acquire(True, None) and lk.locked
    lk.release()
    assert lk.acquire(**{}) and lk.locked
    lk.release()


def test_shared_holders_share_and_exclude_a_writer(segment: str, client: pyshmlock.Client, children: Children, tmp_path: Path) -> None:
    readers = [
        children.spawn("hold", segment, "cfg", "shared", tmp_path / f"ready{i}", tmp_path / "release")
        for i in range(2)
    ]
    wait_until("both readers to hold cfg", lambda: all((tmp_path / f"ready{i}").exists() for i in range(2)))
    # Two processes hold it shared at once; a writer is kept out, a reader is let in.
    assert client.try_lock("cfg") is None
    g = client.try_lock("cfg", shared=True)
    assert g is not None and g.mode == "shared"
    g.release()
    (tmp_path / "release").write_text("")
    for p in readers:
        children.finish(p)
    with client.lock("cfg", timeout=DEADLINE) as w:
        assert w.mode == "exclusive"


def test_a_timeout_is_a_timeout_error_naming_the_holder(segment: str, client: pyshmlock.Client, children: Children, tmp_path: Path) -> None:
    holder = children.spawn("hold", segment, "orders/42", "exclusive", tmp_path / "ready", tmp_path / "release")
    wait_until("the holder", (tmp_path / "ready").exists)
    t0 = time.monotonic()
    with pytest.raises(pyshmlock.Timeout) as e:
        client.lock("orders/42", timeout=0.2)
    assert time.monotonic() - t0 >= 0.2
    assert isinstance(e.value, TimeoutError) and isinstance(e.value, pyshmlock.ShmlockError)
    assert e.value.holder_pid == holder.pid
    assert e.value.holder_label == "child.py"
    assert e.value.held_for > 0 and e.value.waited >= 0.2
    assert e.value.name == "orders/42"
    assert f"pid {holder.pid}" in str(e.value)
    # One try: None from try_lock, WouldBlock (a Timeout) from lock(blocking=False) and timeout=0.
    assert client.try_lock("orders/42") is None
    with pytest.raises(pyshmlock.WouldBlock):
        client.lock("orders/42", blocking=False)
    with pytest.raises(pyshmlock.Timeout):
        client.lock("orders/42", timeout=0)
    (tmp_path / "release").write_text("")
    children.finish(holder)
    assert client.lock("orders/42", timeout=DEADLINE).token > int((tmp_path / "ready").read_text().split()[0])


def test_guards_report_their_grant_and_release_once(client: pyshmlock.Client, segment: str) -> None:
    other = pyshmlock.Client(segment)
    with client.lock("a") as g:
        assert (g.name, g.mode, g.owner_died, g.locked) == ("a", "exclusive", False, True)
        first = g.token
        assert other.try_lock("a") is None
        with pytest.raises(pyshmlock.AlreadyHeld):
            client.lock("a")
    assert not g.locked
    with pytest.raises(pyshmlock.NotHeld):
        g.release()
    g2 = client.acquire(b"a")
    assert g2.token > first and g2.name == b"a"
    g2.release()
    # A guard that is collected gives its lock back.
    client.lock("collected")
    assert other.try_lock("collected") is not None
    # Released inside the block: the block's end is fine.
    with client.lock("inner") as g3:
        g3.release()
    # A lock whose guard was lost track of: unlock by name.
    g4 = client.lock("by-name")
    client.unlock("by-name")
    assert not other.try_lock("by-name") is None
    with pytest.raises(pyshmlock.NotHeld):
        g4.release()


def test_bad_names_and_arguments_get_clear_errors(client: pyshmlock.Client) -> None:
    keep = client.lock("keep")
    with pytest.raises(pyshmlock.BadName) as e:
        client.lock("")
    assert isinstance(e.value, ValueError)
    with pytest.raises(pyshmlock.BadName):
        client.lock("x" * 10_000)
    with pytest.raises(TypeError):
        client.lock(42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        client.lock("n", timeout=float("nan"))
    with pytest.raises(UnicodeEncodeError):
        client.lock("\udcff")
    # Any bytes are a name, and distinct from other bytes.
    a, b = client.lock(b"x\x00y"), client.lock(b"x\x00z")
    assert a.name == b"x\x00y" and b.name == b"x\x00z"
    # Nothing held was lost.
    assert keep.locked
    keep.release()


def test_a_missing_segment_says_how_to_start_shmlockd() -> None:
    with pytest.raises(pyshmlock.SegmentMissing) as e:
        pyshmlock.Client("/shmlock-pytest-does-not-exist")
    assert "shmlockd --segment /shmlock-pytest-does-not-exist" in str(e.value)
    assert e.value.segment == "/shmlock-pytest-does-not-exist"
    with pytest.raises(pyshmlock.BadSegmentName):
        pyshmlock.Client("no-slash")


def test_a_full_table_is_an_error_and_keeps_what_is_held(segment: str) -> None:
    # The default capacities are large: fill a small table made by shmlockd's settings instead.
    c = pyshmlock.Client(segment, create=True)
    held = []
    with pytest.raises(pyshmlock.TableFull):
        for i in range(10_000_000):
            held.append(c.lock(f"n{i}"))
    assert all(g.locked for g in held)
    held[0].release()
    assert c.try_lock("another") is not None


# ---- crashes, signals, threads ----------------------------------------------------------------


def test_kill_9_of_a_holder_tells_the_next_holder(segment: str, client: pyshmlock.Client, children: Children, tmp_path: Path) -> None:
    holder = children.spawn("hold", segment, "state", "exclusive", tmp_path / "ready", tmp_path / "never")
    wait_until("the holder", (tmp_path / "ready").exists)
    token = int((tmp_path / "ready").read_text().split()[0])
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    # No shmlockd here: the waiter itself finds the holder dead and reaps it.
    with client.lock("state", timeout=DEADLINE) as g:
        assert g.owner_died
        assert g.token > token
    with client.lock("state", timeout=DEADLINE) as g:
        assert not g.owner_died
    # The same through a Lock object.
    holder = children.spawn("hold", segment, "state2", "exclusive", tmp_path / "ready2", tmp_path / "never")
    wait_until("the holder", (tmp_path / "ready2").exists)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lk = pyshmlock.Lock(client, "state2", timeout=DEADLINE)
    with lk:
        assert lk.owner_died
    with lk:
        assert not lk.owner_died


@pytest.mark.parametrize("form", ["client", "lock_object"])
def test_ctrl_c_during_a_wait_raises_keyboard_interrupt_and_leaves_nothing_queued(
    segment: str, client: pyshmlock.Client, children: Children, form: str
) -> None:
    g = client.lock("busy")
    waiter = children.spawn("interrupted_wait", segment, "busy", form)
    assert children.readline(waiter).split() == ["waiting"]
    time.sleep(0.3)  # well into its wait (it sleeps in the table, without the GIL)
    sent = time.monotonic()
    waiter.send_signal(signal.SIGINT)
    words = children.readline(waiter).split()
    assert words[0] == "interrupted", words
    latency = float(words[1]) - sent
    assert latency < 5.0, f"KeyboardInterrupt took {latency:.3f}s"  # a hang, not a speed check
    # The waiter is alive with its client open, and its request is gone: a release goes to
    # nobody, so another client gets the lock at once.
    g.release()
    other = pyshmlock.Client(segment)
    assert other.try_lock("busy") is not None
    waiter.kill()


def _wait_in(form: str, other: pyshmlock.Client, result: list) -> None:
    if form == "client.lock":
        result.append(other.lock("gil", timeout=DEADLINE).token)
        return
    lk = pyshmlock.Lock(other, "gil", timeout=DEADLINE)
    if form == "Lock.acquire":
        assert lk.acquire()
    else:
        lk.__enter__()
    result.append(lk.token)


@pytest.mark.parametrize("form", ["client.lock", "Lock.acquire", "with Lock"])
def test_a_wait_releases_the_gil(client: pyshmlock.Client, segment: str, form: str) -> None:
    g = client.lock("gil")
    other = pyshmlock.Client(segment)
    result: list = []
    t = threading.Thread(target=_wait_in, args=(form, other, result))
    t.start()
    # This thread runs Python while the other waits.
    spins = 0
    end = time.monotonic() + 0.2
    while time.monotonic() < end:
        spins += 1
    assert spins > 1000 and t.is_alive()
    g.release()
    t.join(DEADLINE)
    assert result and result[0] > g.token


# ---- multiprocessing: fork and spawn ----------------------------------------------------------


def _use_parents_client(c: pyshmlock.Client, q: "multiprocessing.Queue[str]") -> None:
    try:
        c.lock("forked")
        q.put("locked through the parent's client")
    except pyshmlock.ForkedClient as e:
        own = pyshmlock.Client(c.segment)
        busy = own.try_lock("held-by-parent") is None
        q.put(f"ForkedClient {e.opened_by} {e.pid} {busy} {e}")


def _use_parents_lock_objects(held: pyshmlock.Lock, free: pyshmlock.Lock, q: multiprocessing.Queue) -> None:
    outcomes = []
    for what in (free.acquire, held.release):
        try:
            what()
            outcomes.append("done")
        except pyshmlock.ForkedClient:
            outcomes.append("ForkedClient")
    q.put(" ".join(outcomes))


def test_a_forked_child_cannot_lock_or_unlock_through_its_parents_lock_objects(client: pyshmlock.Client) -> None:
    held, free = pyshmlock.Lock(client, "lock-held-by-parent"), pyshmlock.Lock(client, "lock-free")
    held.acquire()
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_use_parents_lock_objects, args=(held, free, q))
    p.start()
    assert q.get(timeout=DEADLINE) == "ForkedClient ForkedClient"
    p.join(DEADLINE)
    assert p.exitcode == 0
    # The parent's lock is still its own, and the child took nothing.
    assert held.locked and pyshmlock.Client(client.segment).try_lock("lock-held-by-parent") is None
    held.release()
    assert free.acquire(blocking=False)
    free.release()


def test_a_forked_child_gets_forked_client_and_opens_its_own(client: pyshmlock.Client) -> None:
    held = client.lock("held-by-parent")
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_use_parents_client, args=(client, q))
    p.start()
    answer = q.get(timeout=DEADLINE)
    p.join(DEADLINE)
    assert p.exitcode == 0
    words = answer.split()
    assert words[0] == "ForkedClient", answer
    assert int(words[1]) == os.getpid() and int(words[2]) == p.pid
    assert words[3] == "True", "the child's own client sees the parent's lock"
    assert "open a new client in the child" in answer
    # The child's exit gave back nothing of the parent's.
    assert held.locked
    held.release()


def _spawned_worker(segment: str, witness: str, n: int) -> None:
    c = pyshmlock.Client(segment)
    path = Path(witness)
    for _ in range(n):
        with c.lock("spawned", timeout=DEADLINE):
            path.write_text(str(int(path.read_text()) + 1))


def test_spawned_processes_open_their_own_clients(segment: str, client: pyshmlock.Client, tmp_path: Path) -> None:
    witness = tmp_path / "counter"
    witness.write_text("0")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_spawned_worker, args=(segment, str(witness), 200)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(DEADLINE)
        assert p.exitcode == 0
    assert int(witness.read_text()) == 600
    # A client does not travel to another process.
    with pytest.raises(TypeError):
        import pickle

        pickle.dumps(client)


# ---- what the CLI shows -----------------------------------------------------------------------


def test_the_cli_shows_python_owners_by_script_name(segment: str, client: pyshmlock.Client, children: Children) -> None:
    p = children.spawn("label", segment)
    pid = int(children.readline(p).split()[1])
    out = subprocess.run(
        [str(binary("shmlock")), "--segment", segment, "owners", "--json"], check=True, capture_output=True, text=True
    ).stdout
    owners = {o["pid"]: o for o in json.loads(out)}
    assert owners[pid]["label"] == "child.py", owners[pid]
    p.kill()


# ---- the gateway ------------------------------------------------------------------------------


def test_a_remote_client_has_the_same_api(segment: str, daemon: Daemon, children: Children, tmp_path: Path) -> None:
    r = pyshmlock.RemoteClient(daemon.addr)
    other = pyshmlock.RemoteClient(daemon.addr)
    local = pyshmlock.Client(segment)
    assert r.ping() > 0
    with r.lock("remote/1", timeout=5.0) as g:
        assert g.mode == "exclusive" and g.token > 0 and not g.owner_died
        assert local.try_lock("remote/1") is None, "a remote lock is a lock in the segment"
        assert other.try_lock("remote/1") is None
        with pytest.raises(pyshmlock.Timeout) as e:
            other.lock("remote/1", timeout=0.1)
        assert isinstance(e.value, TimeoutError)
        with pytest.raises(pyshmlock.AlreadyHeld):
            r.lock("remote/1")
    with other.lock("remote/1", timeout=DEADLINE, shared=True) as s:
        assert s.mode == "shared"
    with pytest.raises(pyshmlock.BadName):
        r.lock("")
    # A Lock object on a remote client.
    lk = pyshmlock.Lock(r, "remote/2", timeout=5.0)
    with lk:
        assert lk.token > 0 and local.try_lock("remote/2") is None and not lk.lost
        assert pyshmlock.Lock(other, "remote/2").acquire(blocking=False) is False
    assert not lk.locked and local.try_lock("remote/2") is not None
    with pytest.raises(pyshmlock.GatewayConnectionError) as ce:
        pyshmlock.RemoteClient("127.0.0.1:1")
    assert isinstance(ce.value, ConnectionError)


def test_a_remote_guard_is_lost_once_the_gateway_ends_its_session(daemon: Daemon) -> None:
    r = pyshmlock.RemoteClient(daemon.addr)
    g = r.lock("remote/lost", timeout=5.0)
    lk = pyshmlock.Lock(r, "remote/lost2")
    assert lk.acquire()
    assert not g.lost and g.locked and not lk.lost
    daemon.stop()
    with pytest.raises(pyshmlock.ShmlockError):
        r.lock("remote/other", timeout=1.0)
    assert g.lost, "the session ended: the gateway released its locks"
    assert lk.lost and lk.locked


def test_ctrl_c_during_a_remote_wait(segment: str, daemon: Daemon, children: Children) -> None:
    holder = pyshmlock.RemoteClient(daemon.addr)
    g = holder.lock("rbusy")
    code = (
        "import sys, time, pyshmlock\n"
        f"c = pyshmlock.RemoteClient({daemon.addr!r})\n"
        "print('waiting', flush=True)\n"
        "try:\n"
        "    c.lock('rbusy')\n"
        "    print('granted', flush=True)\n"
        "except KeyboardInterrupt:\n"
        "    print('interrupted', time.monotonic(), flush=True)\n"
        "sys.stdin.read()\n"
    )
    p = subprocess.Popen([os.sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    children.procs.append(p)
    assert children.readline(p).split() == ["waiting"]
    time.sleep(0.3)
    sent = time.monotonic()
    p.send_signal(signal.SIGINT)
    words = children.readline(p).split()
    assert words[0] == "interrupted", words
    assert float(words[1]) - sent < 5.0
    g.release()
    assert holder.lock("rbusy", timeout=DEADLINE).token > g.token


def _use_parents_remote(r: pyshmlock.RemoteClient, q: "multiprocessing.Queue[str]") -> None:
    try:
        r.try_lock("other")
        q.put("used the parent's session")
    except pyshmlock.ForkedClient as e:
        q.put(f"ForkedClient {e}")


def test_a_forked_child_cannot_use_its_parents_remote_session(daemon: Daemon) -> None:
    r = pyshmlock.RemoteClient(daemon.addr)
    held = r.lock("remote-held")
    ctx = multiprocessing.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_use_parents_remote, args=(r, q))
    p.start()
    answer = q.get(timeout=DEADLINE)
    p.join(DEADLINE)
    assert answer.startswith("ForkedClient"), answer
    # The child's exit neither ended the parent's session nor gave back its lock.
    assert r.ping() > 0
    assert pyshmlock.RemoteClient(daemon.addr).try_lock("remote-held") is None
    held.release()
