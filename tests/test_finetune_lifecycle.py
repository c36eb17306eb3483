"""``megatron-tasp finetune`` as a user runs it, with real signals on CPU: Ctrl-C stops at a step boundary
with a resumable checkpoint and the resume command, a second run on the same output directory is refused,
SIGTERM exits 143, ``kill -9`` of the launcher takes the ranks with it, and a killed rank is named.

Each test starts ``python -m megatron_tasp.cli finetune`` on a tiny CP=2 recipe (two forked gloo ranks).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests import megatron_helpers as H

H.require_megatron()
psutil = pytest.importorskip("psutil", reason="megatron.core.dist_checkpointing needs psutil to save checkpoints")
pytestmark = pytest.mark.megatron

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1",
           PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
TINY = {
    "name": "tiny",
    "model": {"num_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2,
              "ffn_hidden_size": 128},
    "data": {"source": "stdlib", "max_bytes": 300000, "seq_length": 256, "eval_fraction": 0.05},
    "parallel": {"cp": 2, "device": "cpu"},
    "train": {"steps": 400, "global_batch": 2, "micro_batch": 1, "lr": 3e-3, "warmup_steps": 1, "eval_batches": 0},
    "checkpoint": {"interval": 0, "keep_last": 0},
    "logging": {"progress_bar": True, "plot": False, "interval": 1},
}


class Run:
    """A finetune command in the background, its output collected line by line."""

    def __init__(self, cfg: Path, out: Path, *extra: str, argv: list[str] | None = None) -> None:
        cmd = argv or [sys.executable, "-m", "megatron_tasp.cli", "finetune", str(cfg), f"logging.output_dir={out}"]
        self.proc = subprocess.Popen([*cmd, *extra], env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self._readers = [threading.Thread(target=self._read, args=(s, d), daemon=True)
                         for s, d in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self._readers:
            t.start()

    @staticmethod
    def _read(stream, into: list[str]) -> None:
        for line in stream:
            into.append(line)

    def wait_for(self, pattern: str, within_s: float = 240) -> str:
        end = time.monotonic() + within_s
        while time.monotonic() < end:
            for line in list(self.out):
                if re.search(pattern, line):
                    return line
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no line matching {pattern!r}; stdout:\n{self.text()}")

    def finish(self, within_s: float = 240) -> int:
        rc = self.proc.wait(within_s)
        for t in self._readers:
            t.join(10)
        return rc

    def text(self) -> str:
        return "".join(self.out) + "".join(self.err)

    def ranks(self) -> list[int]:
        return sorted(c.pid for c in psutil.Process(self.proc.pid).children())

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()


@pytest.fixture(scope="module")
def cfg(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(dict(TINY, data=dict(TINY["data"], cache_dir=str(path.parent / "cache")))))
    return path


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _gone(pids: list[int], within_s: float) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.1)
    return False


def test_ctrl_c_stops_at_a_step_saves_and_prints_the_resume_command(cfg, tmp_path):
    out = tmp_path / "run"
    run = Run(cfg, out)
    try:
        run.wait_for(r"^step +1/400")
        run.proc.send_signal(signal.SIGINT)
        assert run.finish() == 130, run.text()
    finally:
        run.kill()
    text, err = run.text(), "".join(run.err)
    assert "Traceback" not in text and "KeyboardInterrupt" not in text
    assert "\r" not in text  # no progress bar drawn into a redirected stream (progress_bar is on)
    step = int(re.search(r"\[finetune\] stopped by SIGINT at step (\d+) of 400\n", err).group(1))
    assert step >= 1
    ck = out / "checkpoints" / f"iter_{step:07d}"
    assert f"[finetune] checkpoint: {ck}\n" in err
    assert (out / "checkpoints" / "latest").read_text().strip() == str(step)
    m = _metrics(out)
    assert (m["end_step"], m["stopped_by"], [s["step"] for s in m["steps"]]) == (step, "SIGINT",
                                                                                  list(range(1, step + 1)))
    resume = re.search(r"\[finetune\] resume with: (.+)\n", err).group(1)
    # The printed command, run as printed (a short run: two more steps).
    again = Run(cfg, out, "--max-steps", str(step + 2), argv=shlex.split(resume))
    assert again.finish() == 0, again.text()
    m = _metrics(out)
    assert m["resumed_from"] == str(ck) and m["stopped_by"] is None
    assert [s["step"] for s in m["steps"]] == list(range(1, step + 3))  # one numbering across the restart
    assert f"resuming from {ck} (step {step}," in again.text()


def test_second_run_on_the_same_output_dir_is_refused_then_sigterm_stops_the_first(cfg, tmp_path):
    out = tmp_path / "run"
    first = Run(cfg, out, "checkpoint.save=false")
    try:
        first.wait_for(r"^step +1/400")
        second = Run(cfg, out)
        assert second.finish() == 2
        err = [line for line in second.err if line.strip()]
        assert len(err) == 1 and second.out == [], second.text()
        assert f"is in use by pid {first.proc.pid} on host " in err[0] and "--wait-for-lock" in err[0]
        first.proc.send_signal(signal.SIGTERM)
        assert first.finish() == 143, first.text()
    finally:
        first.kill()
    assert "Traceback" not in first.text()
    assert re.search(r"stopped by SIGTERM at step \d+ of 400", first.text())
    assert "no checkpoint was saved (checkpoint.save is off" in first.text()


def test_kill_9_of_the_launcher_ends_its_ranks_and_the_next_run_takes_the_lock(cfg, tmp_path):
    out = tmp_path / "run"
    run = Run(cfg, out, "checkpoint.save=false")
    try:
        run.wait_for(r"^step +1/400")
        ranks = run.ranks()
        assert len(ranks) == 2
        run.proc.send_signal(signal.SIGKILL)
        run.finish()
        assert _gone(ranks, 5), "ranks outlived their killed launcher"
    finally:
        run.kill()
    n_steps = len([line for line in run.out if line.startswith("step ")])
    time.sleep(1.0)
    assert not (out / "checkpoints").exists()
    again = Run(cfg, out, "--max-steps", "1", "checkpoint.save=false")
    assert again.finish() == 0, again.text()
    assert f"taking over the stale lock {out / '.megatron-tasp.lock'} of pid {run.proc.pid}" in again.text()
    assert n_steps >= 1


def test_a_killed_rank_is_reported_in_one_line_with_the_last_checkpoint(cfg, tmp_path):
    out = tmp_path / "run"
    run = Run(cfg, out, "checkpoint.interval=2")
    try:
        run.wait_for(r"^step +3/400")  # the checkpoint after step 2 is complete
        victim = run.ranks()[-1]
        os.kill(victim, signal.SIGKILL)
        assert run.finish() == 1, run.text()
    finally:
        run.kill()
    text, err = run.text(), "".join(run.err)
    assert "Traceback" not in text and "Connection reset" not in text
    assert re.search(rf"^megatron-tasp finetune: error: rank \d \(pid {victim}\) was killed by SIGKILL; the other "
                     r"ranks were stopped$", err, re.M), err
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert f"[finetune] last checkpoint: {out / 'checkpoints' / f'iter_{int(latest):07d}'}\n" in err
    assert "[finetune] resume with: " in err
    assert len([line for line in run.err if line.strip()]) == 3


def test_an_output_dir_that_cannot_be_locked_is_a_one_line_error(cfg, capsys):
    from megatron_tasp.cli import main

    assert main(["finetune", str(cfg), f"logging.output_dir={cfg}/x"]) == 2  # a path below a file
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot lock" in err[0] and "Not a directory" in err[0], err
