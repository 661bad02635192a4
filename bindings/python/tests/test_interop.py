"""One lock, one segment, four languages' clients: Python (pyshmlock), Rust (the library's
``examples/counter.rs``), the CLI's ``shmlock run``, and C (``bindings/c/tests/c/counter.c``,
compiled with the system ``cc`` against the library installed into a scratch prefix), all
incrementing one counter file under one exclusive lock at the same time, with shmlockd
supervising. A lost increment would mean two holders at once; each also sees the others' holds."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

import pyshmlock
from conftest import DEADLINE, REPO, Children, Daemon, binary, wait_until


@pytest.fixture(scope="session")
def c_counter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bindings/c/tests/c/counter.c built against libshmlock installed into a scratch prefix
    (the debug build of bindings/c, made here if missing), as a C user builds it: cc and
    pkg-config."""
    prefix = tmp_path_factory.mktemp("c-prefix")
    subprocess.run(["cargo", "build", "-q", "-p", "shmlock-c"], cwd=REPO, check=True)
    lib_dir = Path(binary("shmlockd")).parent
    subprocess.run(
        [str(REPO / "bindings/c/install.sh"), str(prefix)],
        env={**os.environ, "SHMLOCK_LIB_DIR": str(lib_dir)},
        check=True,
        capture_output=True,
    )
    pc = {**os.environ, "PKG_CONFIG_PATH": str(prefix / "lib" / "pkgconfig")}
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "shmlock"], env=pc, check=True, capture_output=True, text=True
    ).stdout.split()
    exe = prefix / "counter"
    src = REPO / "bindings/c/tests/c/counter.c"
    subprocess.run(
        ["cc", "-O2", "-o", str(exe), str(src), *flags, f"-Wl,-rpath,{prefix / 'lib'}"], check=True
    )
    return exe


def rust_counter() -> Path:
    p = Path(binary("shmlockd")).parent / "examples" / "counter"
    assert p.exists(), f"{p} is missing: `cargo build --example counter` (cargo test builds it)"
    return p


def test_python_c_rust_and_shmlock_run_exclude_each_other_on_one_lock(
    segment: str, daemon: Daemon, children: Children, tmp_path: Path, c_counter: Path
) -> None:
    witness = tmp_path / "counter"
    witness.write_text("0")
    name = "interop/counter"
    py = [children.spawn("counter", segment, name, witness, 150) for _ in range(2)]
    rust = subprocess.Popen([str(rust_counter()), segment, name, str(witness), "150"])
    c = subprocess.Popen([str(c_counter), segment, name, "150", str(witness)])
    runs = 15
    script = (
        f'for i in $(seq {runs}); do "$0" --segment "$1" run "$2" -- sh -c \'n=$(cat "$0"); echo $((n+1)) > "$0"\' "$3" '
        "|| exit 1; done"
    )
    cli = subprocess.Popen(["sh", "-c", script, str(binary("shmlock")), segment, name, str(witness)])
    for p in py:
        children.finish(p)
    assert rust.wait(timeout=DEADLINE) == 0
    assert c.wait(timeout=DEADLINE) == 0
    assert cli.wait(timeout=DEADLINE) == 0
    assert int(witness.read_text()) == 2 * 150 + 150 + 150 + runs, "an increment was lost: two holders at once"


def test_a_python_hold_is_seen_by_the_cli_and_the_rust_library(
    segment: str, daemon: Daemon, children: Children, tmp_path: Path
) -> None:
    c = pyshmlock.Client(segment)
    g = c.lock("interop/held")
    # shmlock run gives up at once (exit 75) while Python holds it ...
    r = subprocess.run([str(binary("shmlock")), "--segment", segment, "run", "-n", "interop/held", "--", "true"])
    assert r.returncode == 75
    # ... and shmlock show names the Python process as the holder.
    show = subprocess.run(
        [str(binary("shmlock")), "--segment", segment, "show", "interop/held"], capture_output=True, text=True
    )
    assert f"pid {os.getpid()} " in show.stdout, show.stdout
    g.release()
    r = subprocess.run([str(binary("shmlock")), "--segment", segment, "run", "-n", "interop/held", "--", "true"])
    assert r.returncode == 0
    # A command run under the lock holds it for Python too.
    ready = tmp_path / "ready"
    holder = subprocess.Popen(
        [str(binary("shmlock")), "--segment", segment, "run", "interop/held", "--", "sh", "-c", f"touch {ready}; sleep 30"],
        start_new_session=True,
    )
    children.procs.append(holder)
    wait_until("shmlock run to hold the lock", ready.exists)
    assert c.try_lock("interop/held") is None
    # Wrapper and command killed (their process group): the lock comes back to Python, with
    # the notice that its holder died.
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    with c.lock("interop/held", timeout=DEADLINE) as g:
        assert g.owner_died
