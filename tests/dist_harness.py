"""
Run multi-process (torch.distributed) code from a test: launch a script under torchrun on CPU as a subprocess.

The workers see the same environment a real `torchrun --nproc_per_node=N -m scripts.X` launch gives them
(RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR/PORT), so `nanochat.common.compute_init("cpu")` joins a gloo
process group exactly as in production. Each rank's output comes back prefixed with `[rank<r>]: `.

    from dist_harness import run_torchrun
    result = run_torchrun(["tests/_optim_worker.py", "--out", str(tmp_path)], nproc=2)
    print(result.stdout)

The workers run through tests/nccl_rules.py, which holds their collectives to NCCL's device rule.

Design for reuse: the worker writes whatever the test needs to check (tensors, JSON) under a directory the
test passes on its command line; the harness only launches, bounds the wall time, and turns any failure into
an assertion error that carries every rank's output.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (the OS picks it; a race with another process is
    possible, which run_torchrun handles by retrying once with a new port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(text, limit=6000):
    return text if len(text) <= limit else "...\n" + text[-limit:]


def _launch(cmd, env, cwd, timeout):
    # A new session lets a timeout kill torchrun *and* its workers: ranks blocked in a collective would
    # otherwise outlive the test.
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f"torchrun did not finish within {timeout} s: {' '.join(cmd)}\n"
                             f"--- stdout ---\n{_tail(stdout)}\n--- stderr ---\n{_tail(stderr)}") from None
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_torchrun(args, nproc=2, env=None, timeout=120, cwd=REPO_ROOT, check=True, nccl_rules=True):
    """Run `python -m torch.distributed.run --nproc-per-node <nproc> ... <args>` and return its CompletedProcess.

    args: what follows the torchrun options: a script path and its arguments (["tests/w.py", "--x", "1"]) or a
      module (["-m", "scripts.base_train", "--", "--depth", "2"]).
    env: extra environment variables on top of os.environ. OMP_NUM_THREADS defaults to 1 (N ranks on a small
      CPU box would otherwise oversubscribe it) and the repo root is put on PYTHONPATH.
    timeout: seconds before torchrun and every worker are killed and the test fails.
    check: raise AssertionError (with every rank's output) when torchrun exits non-zero.
    nccl_rules: launch the workers through tests/nccl_rules.py, so that a collective handed a tensor NCCL would
      refuse (built on the host, or off the run's device) fails the run as it would on GPUs.
    """
    if nccl_rules:
        args = [str(REPO_ROOT / "tests" / "nccl_rules.py"), *args]
    full_env = dict(os.environ)
    full_env.setdefault("OMP_NUM_THREADS", "1")
    full_env["PYTHONUNBUFFERED"] = "1"
    full_env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), full_env.get("PYTHONPATH")) if p)
    full_env.update(env or {})
    with tempfile.TemporaryDirectory(prefix="torchrun-logs-") as log_dir:
        for attempt in range(2):
            cmd = [
                sys.executable, "-m", "torch.distributed.run",
                "--nnodes", "1", "--nproc-per-node", str(nproc),
                "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                # tee + log dir: per-rank prefixed output on the console, and torchrun's log files land in our
                # temp dir instead of a /tmp/torchelastic_* directory that nobody deletes.
                "--tee", "3", "--log-dir", log_dir, "--log-line-prefix-template", "[rank${rank}]: ",
                *map(str, args),
            ]
            result = _launch(cmd, full_env, cwd, timeout)
            port_taken = "address already in use" in (result.stdout + result.stderr).lower()
            if result.returncode == 0 or not port_taken or attempt == 1:
                break
    if check and result.returncode != 0:
        raise AssertionError(f"torchrun exited with code {result.returncode}: {' '.join(cmd)}\n"
                             f"--- stdout ---\n{_tail(result.stdout)}\n--- stderr ---\n{_tail(result.stderr)}")
    return result
