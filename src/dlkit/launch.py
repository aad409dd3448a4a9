"""`dlkit run RECIPE --nproc N`: torchrun's elastic agent started by dlkit, so that one command runs a
recipe on N processes and fails, or stops, the way one process does.

The agent (`python -m torch.distributed.run --standalone --nproc-per-node N -m dlkit ...`) runs in
its own session: a Ctrl-C in the terminal reaches dlkit alone, which hands exactly one SIGINT to the
agent, which relays it to every worker (each writes no more than rank 0's checkpoint and stops).
Workers under this launcher report a failure by writing its one line into DLKIT_ERROR_DIR instead of
printing it; the launcher prints the first of them once (`error: ... (rank 1)`), where torchrun
alone would print a report per failed worker. The agent's own log lines are left out.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

ERROR_DIR = "DLKIT_ERROR_DIR"
# what dlkit itself writes on stderr; the agent's logging and its failure report are left out
OURS = ("error:", "warning:", "interrupted", "resume with:", "Ctrl-C:", "SIGTERM:", "holding after step")


def launch(nproc: int, argv: list[str]) -> int:
    """Run `dlkit <argv>` on `nproc` processes of this machine; returns the exit code to leave with."""
    with tempfile.TemporaryDirectory(prefix="dlkit-errors-") as errors:
        env = os.environ | {ERROR_DIR: errors}
        # torchrun would set 1 thread per worker and warn; share the cores instead
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "-m", "dlkit", *argv]
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
        relay = threading.Thread(target=_relay, args=(proc,), daemon=True)
        relay.start()
        before = signal.signal(signal.SIGINT, lambda s, f: proc.send_signal(signal.SIGINT))
        term = signal.signal(signal.SIGTERM, lambda s, f: proc.send_signal(signal.SIGTERM))
        try:
            code = proc.wait()
        finally:
            signal.signal(signal.SIGINT, before)
            signal.signal(signal.SIGTERM, term)
        relay.join(timeout=5)
        failures = sorted(Path(errors).glob("rank-*.txt"), key=lambda p: p.stat().st_mtime_ns)
        if failures:
            lines = [f.read_text(encoding="utf-8").strip() for f in failures]
            # a mistake every rank makes (a recipe field) is said once, as one process says it
            where = "" if len(set(lines)) == 1 and len(lines) == nproc else f" (rank {failures[0].stem.split('-')[1]})"
            print(f"error: {lines[0]}{where}", file=sys.stderr, flush=True)
            return 2
        exits = [int(p.read_text()) for p in Path(errors).glob("exit-*.txt")]
        if exits:  # interrupted workers: 130 (Ctrl-C) or 143 (SIGTERM), as one process exits
            return max(exits)
        if code < 0:  # the agent itself was killed by a signal
            return 128 - code
        return code


def _relay(proc: subprocess.Popen) -> None:
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith(OURS):
            sys.stderr.write(line)
            sys.stderr.flush()


def report_failure(message: str) -> bool:
    """A worker's failure under this launcher: its line written for the launcher to print (True);
    False when not under it (the worker prints the line itself)."""
    folder = os.environ.get(ERROR_DIR)
    if not folder:
        return False
    (Path(folder) / f"rank-{os.environ.get('RANK', '0')}.txt").write_text(message + "\n", encoding="utf-8")
    return True


def report_exit(code: int) -> None:
    """A worker leaving with `code` (interrupted), for the launcher to leave with the same."""
    folder = os.environ.get(ERROR_DIR)
    if folder:
        (Path(folder) / f"exit-{os.environ.get('RANK', '0')}.txt").write_text(str(code), encoding="utf-8")


def without_nproc(argv: list[str]) -> list[str]:
    """`argv` less its `--nproc N` / `--nproc=N` (the workers run one process each)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
