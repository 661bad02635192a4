#!/usr/bin/env python3
"""Python cross-process locks side by side, in one run: lock+unlock pairs per second for
pyshmlock, filelock, portalocker, fasteners, a bare ``fcntl.flock`` on an open fd, and
``multiprocessing.Lock``; uncontended (one process) in two forms, the library's own calls
(``lock.acquire(); lock.release()``, bound methods called directly) and a ``with`` block, every
system and form in alternating batches; and with 2 and 4 processes on one name (grants/s, p99
wait, timed on one acquire in 8, and ``spread``: how far the process furthest from an equal share
of the grants is from it).
``pyshmlock`` is a ``pyshmlock.Lock`` kept for reuse; ``pyshmlock client.lock`` takes a new
``Guard`` per pair (``client.lock(name).release()``).

    python bindings/python/bench.py               # a table
    python bindings/python/bench.py --json        # the same figures as JSON

Needs ``pip install ./bindings/python filelock portalocker fasteners`` (a library that is
missing is reported and skipped). Uses a scratch segment of its own (no shmlockd needed) and
a scratch directory for the file locks.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import multiprocessing
import os
import sys
import tempfile
import time
from functools import partial
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

# A lock as the benchmark uses it, made in the process that uses it: ``acquire`` and ``release``,
# the library's own calls as a program makes them (bound methods or C-level partials, never a
# Python wrapper that would add its own call to every pair): ``release()`` after ``acquire()``,
# or, where ``takes_guard`` is true, ``release(acquire())`` (a guard per grant); ``loop(n)``: n
# pairs of those calls; and ``with_loop(n)``: n ``with`` blocks as a program writes them
# (``with lock:`` for a lock object, ``with client.lock(name):`` for a guard), or None where the
# library has no context manager (a bare flock).
class Pair(NamedTuple):
    acquire: Callable[[], object]
    release: Callable[..., object]
    takes_guard: bool
    loop: Callable[[int], None]
    with_loop: Optional[Callable[[int], None]]


def methods(lk: object) -> Pair:
    """A lock object with acquire() and release() methods and a context manager."""

    def with_loop(n: int) -> None:
        for _ in range(n):
            with lk:  # type: ignore[attr-defined]
                pass

    acquire, release = lk.acquire, lk.release  # type: ignore[attr-defined]
    return Pair(acquire, release, False, methods_loop(acquire, release), with_loop)


def methods_loop(acquire: Callable[[], object], release: Callable[[], object]) -> Callable[[int], None]:
    def loop(n: int) -> None:
        for _ in range(n):
            acquire()
            release()

    return loop


def make_shmlock(ctx: dict) -> Pair:
    import pyshmlock

    lk = pyshmlock.Lock(pyshmlock.Client(ctx["segment"]), "bench")
    return methods(lk)


def make_shmlock_guard(ctx: dict) -> Pair:
    import pyshmlock

    lock = pyshmlock.Client(ctx["segment"]).lock

    def loop(n: int) -> None:
        for _ in range(n):
            lock("bench").release()

    def with_loop(n: int) -> None:
        for _ in range(n):
            with lock("bench"):
                pass

    return Pair(partial(lock, "bench"), pyshmlock.Guard.release, True, loop, with_loop)


def make_filelock(ctx: dict) -> Pair:
    import filelock

    lk = filelock.FileLock(os.path.join(ctx["dir"], "filelock.lock"))
    return methods(lk)


def make_portalocker(ctx: dict) -> Pair:
    import portalocker

    lk = portalocker.Lock(os.path.join(ctx["dir"], "portalocker.lock"), timeout=60)
    return methods(lk)


def make_fasteners(ctx: dict) -> Pair:
    import fasteners

    lk = fasteners.InterProcessLock(os.path.join(ctx["dir"], "fasteners.lock"))
    return methods(lk)


def make_flock(ctx: dict) -> Pair:
    fd = os.open(os.path.join(ctx["dir"], "flock.lock"), os.O_RDWR | os.O_CREAT, 0o600)
    flock, ex, un = fcntl.flock, fcntl.LOCK_EX, fcntl.LOCK_UN

    def loop(n: int) -> None:
        for _ in range(n):
            flock(fd, ex)
            flock(fd, un)

    return Pair(partial(flock, fd, ex), partial(flock, fd, un), False, loop, None)


def make_mp_lock(ctx: dict) -> Pair:
    lk = ctx["mp_lock"]
    return methods(lk)


SYSTEMS: Dict[str, Tuple[Callable[[dict], Pair], Optional[str]]] = {
    "pyshmlock": (make_shmlock, "pyshmlock"),
    "pyshmlock client.lock": (make_shmlock_guard, "pyshmlock"),
    "filelock": (make_filelock, "filelock"),
    "portalocker": (make_portalocker, "portalocker"),
    "fasteners": (make_fasteners, "fasteners"),
    "fcntl.flock": (make_flock, None),
    "multiprocessing.Lock": (make_mp_lock, None),
}


def uncontended(systems: Dict[str, Callable[[dict], Pair]], ctx: dict, seconds: float) -> Dict[str, dict]:
    """Pairs per second in one process, in batches between clock reads, for every system and
    both forms (the library's acquire and release called directly; a ``with`` block) in
    alternating batches, so a slower moment of the machine falls on all of them alike."""
    forms: Dict[Tuple[str, str], Callable[[int], None]] = {}
    for name, make in systems.items():
        pair = make(ctx)
        forms[(name, "call")] = pair.loop
        if pair.with_loop is not None:
            forms[(name, "with")] = pair.with_loop
    for run in forms.values():  # warm-up
        run(1000)
    batch = 1000
    totals = {k: [0, 0.0] for k in forms}
    end = time.perf_counter() + seconds * len(forms)
    while time.perf_counter() < end:
        for k, run in forms.items():
            t0 = time.perf_counter()
            run(batch)
            totals[k][0] += batch
            totals[k][1] += time.perf_counter() - t0
    out: Dict[str, dict] = {name: {} for name in systems}
    for (name, f), (pairs, elapsed) in totals.items():
        out[name][f"{f}_pairs_per_s"] = pairs / elapsed
        out[name][f"{f}_ns_per_pair"] = elapsed / pairs * 1e9
    return out


# One acquire in this many is timed (for the p99 wait): two clock reads and a store on every
# grant would cost more than a whole uncontended pyshmlock pair, and the lock would be measured
# through the harness. The untimed ones run the same calls; the deadline is checked at each
# timed one.
SAMPLE = 8


def worker(make: Callable[[dict], Pair], ctx: dict, seconds: float, barrier, out) -> None:
    """One of the contending processes: its grants, and the waits (ns) of one acquire in
    ``SAMPLE``, until the deadline."""
    from array import array

    pair = make(ctx)
    acquire, release = pair.acquire, pair.release
    untimed = range(SAMPLE - 1)
    waits = array("q")
    clock = time.perf_counter_ns
    barrier.wait()
    end = clock() + int(seconds * 1e9)
    grants = 0
    if pair.takes_guard:
        while True:
            for _ in untimed:
                release(acquire())
            t0 = clock()
            g = acquire()
            t1 = clock()
            release(g)
            grants += SAMPLE
            waits.append(t1 - t0)
            if t1 >= end:
                break
    else:
        while True:
            for _ in untimed:
                acquire()
                release()
            t0 = clock()
            acquire()
            t1 = clock()
            release()
            grants += SAMPLE
            waits.append(t1 - t0)
            if t1 >= end:
                break
    out.put((grants, waits.tobytes()))


def contended(make: Callable[[dict], Pair], ctx: dict, procs: int, seconds: float) -> dict:
    """`procs` processes on one lock for `seconds`: grants/s, p99 wait, and the share spread."""
    from array import array

    mp = multiprocessing.get_context("fork")
    barrier, out = mp.Barrier(procs), mp.Queue()
    ps = [mp.Process(target=worker, args=(make, ctx, seconds, barrier, out)) for _ in range(procs)]
    for p in ps:
        p.start()
    results = [out.get(timeout=seconds * 20 + 60) for _ in ps]
    for p in ps:
        p.join()
    counts = [r[0] for r in results]
    waits = array("q")
    for r in results:
        waits.frombytes(r[1])
    waits = sorted(waits)
    mean = sum(counts) / len(counts)
    return {
        "grants_per_s": sum(counts) / seconds,
        "p99_wait_us": waits[int(len(waits) * 0.99)] / 1e3 if waits else 0.0,
        "share_spread": max(abs(c - mean) / mean for c in counts) if mean else 0.0,
        "grants": counts,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=1.0, help="length of each measurement (default 1)")
    ap.add_argument("--procs", default="2,4", help="contending process counts (default 2,4)")
    ap.add_argument("--only", help="comma-separated systems to run (default: all)")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args()
    procs = [int(p) for p in args.procs.split(",") if p]
    only = set(args.only.split(",")) if args.only else None

    segment = f"/shmlock-pybench-{os.getpid()}"
    report: Dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="shmlock-pybench-") as d:
        ctx = {"segment": segment, "dir": d, "mp_lock": multiprocessing.get_context("fork").Lock()}
        try:
            import pyshmlock

            keep = pyshmlock.Client(segment, create=True)  # noqa: F841 (keeps the segment open)
        except ImportError:
            pass
        try:
            present: Dict[str, Callable[[dict], Pair]] = {}
            for name, (make, module) in SYSTEMS.items():
                if only and name not in only:
                    continue
                if module:
                    try:
                        __import__(module)
                    except ImportError:
                        report[name] = {"missing": f"pip install {module}"}
                        continue
                present[name] = make
            for name, u in uncontended(present, ctx, args.seconds).items():
                report[name] = {"uncontended": u}
            for name, make in present.items():
                for n in procs:
                    report[name][f"procs_{n}"] = contended(make, ctx, n, args.seconds)
        finally:
            try:
                os.unlink(f"/dev/shm{segment}")
            except FileNotFoundError:
                pass

    if args.json:
        for r in report.values():
            for v in r.values():
                if isinstance(v, dict):
                    v.pop("grants", None)
        json.dump({"seconds": args.seconds, "cpus": os.cpu_count(), "results": report}, sys.stdout, indent=2)
        print()
        return
    head = f"{'system':22} {'pairs/s':>12} {'ns/pair':>9} {'with: ns':>9}"
    for n in procs:
        head += f" | {n} procs: {'grants/s':>10} {'p99 wait':>10} {'spread':>7}"
    print(head)
    for name, r in report.items():
        if "missing" in r:
            print(f"{name:22} (missing: {r['missing']})")
            continue
        u = r["uncontended"]
        with_ns = f"{u['with_ns_per_pair']:9.0f}" if "with_ns_per_pair" in u else f"{'-':>9}"
        line = f"{name:22} {u['call_pairs_per_s']:12,.0f} {u['call_ns_per_pair']:9.0f} {with_ns}"
        for n in procs:
            c = r[f"procs_{n}"]
            line += f" | {'':8}{c['grants_per_s']:10,.0f} {c['p99_wait_us']:8.1f}us {c['share_spread']:6.0%}"
        print(line)
    base = report.get("pyshmlock", {})
    if "uncontended" in base:
        print()
        print("pyshmlock against each (ratios of pairs/s and grants/s; above 1: pyshmlock does more):")
        ours = base["uncontended"]
        for name, r in report.items():
            if name == "pyshmlock" or "uncontended" not in r:
                continue
            u = r["uncontended"]
            line = f"  {name:22} uncontended {ours['call_pairs_per_s'] / u['call_pairs_per_s']:8.3g}x"
            if "with_pairs_per_s" in u:
                line += f" ({ours['with_pairs_per_s'] / u['with_pairs_per_s']:.3g}x in `with`)"
            for n in procs:
                line += f", {n} procs {base[f'procs_{n}']['grants_per_s'] / r[f'procs_{n}']['grants_per_s']:.3g}x"
            print(line)

if __name__ == "__main__":
    main()
