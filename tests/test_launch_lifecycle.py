"""Lifecycle of forked ranks with real processes and real signals (CPU, gloo): ranks die with a killed
launcher (prctl and the pipe watch alone), a killed rank is named, and the output-directory lock."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from megatron_tasp.launch import WorkerError, run_workers
from megatron_tasp.launch.lifecycle import describe_exit, exit_code_for
from megatron_tasp.launch.lock import DirLock, LockHeld

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait_gone(pids: list[int], within_s: float) -> list[int]:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.1)
    return [p for p in pids if _alive(p)]


def _wait_file_lines(path: Path, n: int, within_s: float) -> list[str]:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        lines = path.read_text().split() if path.exists() else []
        if len(lines) >= n:
            return lines
        time.sleep(0.1)
    raise AssertionError(f"{path}: fewer than {n} lines after {within_s}s")


LAUNCHER = """
import os, sys, time
from megatron_tasp.launch import run_workers

def sleeper(rank, world, path):
    with open(path, "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    time.sleep(600)

run_workers(sleeper, 2, sys.argv[1], timeout_s=600)
"""


def test_ranks_die_with_a_killed_launcher(tmp_path):
    """kill -9 of the process that forked the ranks: every rank is gone within seconds."""
    pids_file = tmp_path / "pids"
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, str(pids_file)], env=ENV)
    try:
        ranks = [int(x) for x in _wait_file_lines(pids_file, 2, 60)]
        assert all(_alive(p) for p in ranks)
        launcher.kill()
        launcher.wait(10)
        assert _wait_gone(ranks, 5) == []
    finally:
        launcher.kill()


WATCH_ONLY = """
import os, sys, time
from megatron_tasp.launch.lifecycle import ParentWatch

watch = ParentWatch()
pid = os.fork()
if pid == 0:
    watch.attach(use_prctl=False)  # the fallback alone, as where prctl does not exist
    with open(sys.argv[1], "a") as fh:
        fh.write(f"{os.getpid()}\\n")
    time.sleep(600)
    os._exit(0)
time.sleep(600)
"""


def test_pipe_watch_alone_ends_the_child(tmp_path):
    pids_file = tmp_path / "pids"
    parent = subprocess.Popen([sys.executable, "-c", WATCH_ONLY, str(pids_file)], env=ENV)
    try:
        child = int(_wait_file_lines(pids_file, 1, 60)[0])
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        assert _wait_gone([child], 5) == []
    finally:
        parent.kill()


def _barrier_then_die(rank: int, world: int) -> int:
    import torch.distributed as dist

    dist.barrier()
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    for _ in range(100):
        dist.barrier()  # rank 0 loses its peer here
    return rank


def test_a_killed_rank_is_named_not_its_peers_connection_error():
    with pytest.raises(WorkerError) as info:
        run_workers(_barrier_then_die, 2, timeout_s=60)
    err = info.value
    assert err.failures[0].rank == 1 and err.failures[0].exitcode == -signal.SIGKILL
    assert err.summary.startswith("rank 1 (pid ") and err.summary.endswith("was killed by SIGKILL")
    assert "\n" not in err.summary and "Traceback" not in err.summary


def test_describe_exit():
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"
    assert describe_exit(3) == "exited with code 3"
    assert (exit_code_for(signal.SIGINT), exit_code_for(signal.SIGTERM)) == (130, 143)


HOLDER = """
import sys, time
from megatron_tasp.launch.lock import DirLock
DirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(600)
"""


def test_lock_refuses_a_second_process_then_takes_over_a_stale_lock(tmp_path, caplog):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        t0 = time.monotonic()
        with pytest.raises(LockHeld) as info:
            DirLock(out).acquire()
        msg = str(info.value)
        assert time.monotonic() - t0 < 2  # refuses at once
        assert f"pid {holder.pid} on host {socket.gethostname()}" in msg and "\n" not in msg
        assert "--wait-for-lock" in msg and "another output directory" in msg
        holder.kill()  # killed: the lock file still names it, the flock is gone with the process
        holder.wait(10)
        with caplog.at_level(logging.WARNING, logger="megatron_tasp.finetune"):
            with DirLock(out) as lock:
                assert f"pid={os.getpid()}" in lock.path.read_text()
        assert f"taking over the stale lock {out / '.megatron-tasp.lock'} of pid {holder.pid}" in caplog.text
        assert (out / ".megatron-tasp.lock").read_text() == ""  # released cleanly: nothing stale left
    finally:
        holder.kill()


def test_wait_for_lock_waits_for_the_holder(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        killer = subprocess.Popen(["sh", "-c", f"sleep 1; kill {holder.pid}"])
        t0 = time.monotonic()
        lock = DirLock(out).acquire(wait=True, poll_s=0.1)
        assert time.monotonic() - t0 >= 0.5
        lock.release()
        killer.wait(10)
    finally:
        holder.kill()


def _sleep_worker(rank: int, world: int, started: str) -> None:
    Path(f"{started}.{rank}").write_text("up")
    time.sleep(600)


def test_forwarded_second_signal_kills_the_ranks(tmp_path):
    """With forward_signals, the launcher's second SIGINT ends ranks that ignore the first."""
    import threading

    started = tmp_path / "started"

    def interrupt_twice() -> None:  # once the ranks run, i.e. the launcher's handlers are in place
        while not all(Path(f"{started}.{r}").exists() for r in range(2)):
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_twice, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(WorkerError) as info:  # the ranks block the signals (fn never installs handlers)
        run_workers(_sleep_worker, 2, str(started), timeout_s=60, forward_signals=True)
    assert time.monotonic() - t0 < 30
    assert "second signal" in info.value.summary and "SIGKILL" in info.value.summary


def test_forked_ranks_without_forwarding_see_default_signals():
    script = textwrap.dedent("""
        import os, signal
        from megatron_tasp.launch import run_workers
        def fn(rank, world):
            return signal.getsignal(signal.SIGINT) is signal.default_int_handler and not signal.pthread_sigmask(
                signal.SIG_BLOCK, [])
        print(run_workers(fn, 2))
    """)
    out = subprocess.run([sys.executable, "-c", script], env=ENV, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "[True, True]", out.stderr[-2000:]
