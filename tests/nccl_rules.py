"""
Hold torch.distributed collectives to NCCL's device rule on CPU (gloo) test runs.

NCCL only takes tensors on the process's CUDA device; gloo takes CPU tensors too, so a collective fed
`torch.tensor(1)` passes every CPU test and crashes the first multi-GPU run. On CPU the run's device *is*
the CPU, so comparing devices can't tell "built with device=" from "built on the host by default". Two
pieces make the difference visible on the test ranks:

- a TorchFunctionMode marks every tensor a factory (torch.tensor, zeros, arange, from_numpy...) builds
  without `device=`, and every tensor computed only from marked ones; `.to(device)` clears the mark, since
  on a GPU run that is the moment the value reaches the device;
- the collectives of `torch.distributed` are wrapped: a marked tensor, or one off the run's device (CUDA's
  current device under NCCL, else the CPU), raises NcclRuleError naming the collective and the caller.

    import nccl_rules
    nccl_rules.install()  # in a rank process, before the code under test runs

`python tests/nccl_rules.py -m scripts.base_train -- ...` (or `tests/nccl_rules.py tests/w.py ...`) installs
the rules and runs the module or script, which is how tests/dist_harness.py launches torchrun workers.
"""

import functools
import os
import runpy
import sys
import traceback

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

# The collectives whose tensors NCCL moves. all_gather_object / broadcast_object_list are left out: they
# pickle Python objects and place the tensors themselves.
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce", "reduce_scatter",
               "reduce_scatter_tensor", "gather", "scatter", "all_to_all", "all_to_all_single")

# Factories that build a tensor from host data or from nothing: on the host unless given device=.
_FACTORIES = {torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.zeros, torch.ones, torch.empty, torch.full,
              torch.arange, torch.linspace, torch.logspace, torch.eye, torch.rand, torch.randn, torch.randint,
              torch.randperm, torch.from_numpy, torch.frombuffer}
_MOVES = {torch.Tensor.to, torch.Tensor.cuda}
_MARK = "_nccl_rules_host"


class NcclRuleError(RuntimeError):
    """A collective got a tensor that NCCL would refuse."""


def _is_host(t):
    return getattr(t, _MARK, False)


def _names_device(args, kwargs):
    """True when a .to()/.cuda() call says where the tensor goes (a device, a device string, or another tensor)."""
    if "device" in kwargs or "other" in kwargs:
        return True
    for a in args[1:]:
        if isinstance(a, (torch.device, torch.Tensor, int)) and not isinstance(a, bool):
            return True
        if isinstance(a, str):
            return True
    return False


class _HostTracker(TorchFunctionMode):
    """Marks tensors that a GPU run would still hold on the host (see the module docstring)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if torch.compiler.is_compiling():
            return out  # inside a compiled graph: nothing there is handed to a collective
        if func in _FACTORIES:
            host = "device" not in kwargs and not (args and isinstance(args[0], torch.Tensor))
        elif func in _MOVES and (func is torch.Tensor.cuda or _names_device(args, kwargs)):
            host = False
        else:
            inputs = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            host = bool(inputs) and all(_is_host(t) for t in inputs)
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                try:
                    setattr(t, _MARK, host)
                except (AttributeError, RuntimeError):  # tensor types without a __dict__
                    pass
        return out


def _run_device():
    """The device NCCL would require on this rank: CUDA's current one under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _caller():
    """file:line of the code that called the collective (the first frame outside this module and torch)."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if frame.filename != __file__ and f"{os.sep}torch{os.sep}" not in frame.filename:
            return f"{frame.filename}:{frame.lineno}: {frame.line}"
    return "unknown caller"


def _checked(name, collective):
    @functools.wraps(collective)
    def run(*args, **kwargs):
        device = _run_device()
        for t in pytree.tree_leaves((args, kwargs)):
            if not isinstance(t, torch.Tensor):
                continue
            if t.device != device:
                raise NcclRuleError(f"dist.{name} got a tensor on {t.device}, not the run's device {device} "
                                    f"(NCCL refuses it), at {_caller()}")
            if _is_host(t):
                raise NcclRuleError(f"dist.{name} got a tensor built on the host without device= (a GPU run hands "
                                    f"NCCL a CPU tensor and crashes), at {_caller()}")
        return collective(*args, **kwargs)

    run._nccl_rules = True
    return run


def install():
    """Start tracking host-built tensors on this thread and wrap torch.distributed's collectives (idempotent)."""
    for name in COLLECTIVES:
        collective = getattr(dist, name)
        if not getattr(collective, "_nccl_rules", False):
            setattr(dist, name, _checked(name, collective))
    if not getattr(install, "mode", None):
        install.mode = _HostTracker()
        install.mode.__enter__()  # stays on for the life of the process


def _launch(argv):
    """`-m module args...` or `script.py args...`: install the rules, then run it as __main__."""
    install()
    if argv[0] == "-m":
        rest = argv[3:] if argv[2:3] == ["--"] else argv[2:]  # torchrun drops the "--" after a module name
        sys.argv = [argv[1], *rest]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    _launch(sys.argv[1:])
