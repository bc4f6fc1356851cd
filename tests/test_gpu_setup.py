"""A GPU machine that torch can't use stops the run in one line instead of training on the CPU; the GPU scripts
start one process per GPU. Tested on CPU with a stub `nvidia-smi` and a stubbed torch.cuda."""

import os
import subprocess
import sys

import pytest
import torch

from dist_harness import REPO_ROOT
from nanochat import common

STUB = """#!/bin/sh
case "$*" in
  *--list-gpus*) i=0; while [ $i -lt {n} ]; do echo "GPU $i: NVIDIA H100 80GB HBM3 (UUID: GPU-$i)"; i=$((i+1)); done ;;
  *driver_version*) i=0; while [ $i -lt {n} ]; do echo "535.104.05"; i=$((i+1)); done ;;
esac
"""


@pytest.fixture
def gpu_machine(tmp_path, monkeypatch):
    """PATH starts with a stub nvidia-smi listing `n` H100s on driver 535 (older than CUDA 13 needs); torch
    sees no CUDA, as on such a machine with PyPI's torch. Returns the PATH to hand to subprocesses."""

    def make(n=4):
        stub = tmp_path / "bin" / "nvidia-smi"
        stub.parent.mkdir(exist_ok=True)
        stub.write_text(STUB.format(n=n))
        stub.chmod(0o755)
        path = f"{stub.parent}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}"
        monkeypatch.setenv("PATH", path)
        return path

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", "13.2")
    monkeypatch.setattr(common, "NVIDIA_PROC_VERSION", str(tmp_path / "no_driver"))
    return make


def test_an_unusable_gpu_is_named_with_driver_cuda_and_the_fix(gpu_machine):
    gpu_machine()
    problem = common.unusable_gpu_problem()
    version = torch.__version__.split("+")[0]
    assert "driver 535.104.05" in problem and "CUDA 13.2" in problem and "580.65.06" in problem
    assert f"uv pip install --torch-backend=auto torch=={version}" in problem
    with pytest.raises(common.ConfigError, match="^--device-type cuda: this machine has an NVIDIA GPU"):
        common.compute_init("cuda")


def test_torchrun_never_falls_back_to_cpu_ranks_but_one_process_warns(gpu_machine, monkeypatch, caplog):
    gpu_machine()
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(common.ConfigError, match="driver 535.104.05"):
        common.autodetect_device_type()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert common.autodetect_device_type() == "cpu"
    assert any(r.levelname == "WARNING" and "driver 535.104.05" in r.getMessage() for r in caplog.records)


def test_the_kernel_module_is_the_second_sign(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    proc = tmp_path / "version"
    monkeypatch.setattr(common, "NVIDIA_PROC_VERSION", str(proc))
    assert common.nvidia_driver() is None and common.unusable_gpu_problem() is None  # a CPU machine is fine
    proc.write_text("NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  550.54.14  Release Build\n")
    assert common.nvidia_driver() == "550.54.14"


def _bash(script, path):
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source pipeline.sh; {script}"], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=120,
                          env={k: v for k, v in os.environ.items() if k != "NPROC_PER_NODE"} | {"PATH": path})


def test_gpu_scripts_start_one_process_per_gpu_and_stop_on_an_unusable_one(gpu_machine):
    run = _bash('gpu_processes; echo "$NPROC_PER_NODE|$NPROC_NOTE"', gpu_machine(n=4))
    assert run.stdout.strip() == "4|NPROC_PER_NODE=4 (default: one process per GPU; nvidia-smi lists 4)", run.stderr
    run = _bash("NPROC_PER_NODE=2 gpu_processes; echo \"$NPROC_NOTE\"", gpu_machine(n=4))
    assert run.stdout.strip() == "NPROC_PER_NODE=2 (set by the caller)"
    # require_gpu runs the real check in a fresh interpreter: torch here really sees no CUDA.
    run = _bash("require_gpu; echo went on", gpu_machine(n=1))
    assert run.returncode == 1 and "went on" not in run.stdout
    assert run.stderr.strip().splitlines()[-1].startswith("error: bash: this machine has an NVIDIA GPU (driver 535.104.05)")


@pytest.mark.parametrize("script", ["speedrun.sh", "runrtx4070.sh"])
def test_gpu_run_scripts_check_the_gpu_before_any_stage(script):
    text = (REPO_ROOT / script).read_text()
    assert text.index("\nrequire_gpu\n") < text.index("\nstage ")
    if script == "speedrun.sh":  # one process per GPU, decided before the first log line names it
        assert "NPROC_PER_NODE:-8" not in text and text.index("\ngpu_processes") < text.index("\npipeline_setup")


def test_every_stage_gets_the_training_allocator_config(monkeypatch):
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    common.compute_init("cpu")
    assert os.environ["PYTORCH_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:128")  # the user's choice wins
    common.compute_init("cpu")
    assert os.environ["PYTORCH_ALLOC_CONF"] == "max_split_size_mb:128"
    # The stages that allocate large CUDA memory all start through compute_init (start_run calls it).
    for script in ("chat_rl", "base_eval", "chat_eval", "base_train"):
        text = (REPO_ROOT / "scripts" / f"{script}.py").read_text()
        assert "compute_init(" in text or "start_run(" in text, script
