"""Collectives follow NCCL's device rule: every tensor handed to torch.distributed lives on the run's device.

Two checks: a static one over every collective in nanochat/ and scripts/ (it also sees the CUDA-only paths that
no CPU run reaches), and tests/nccl_rules.py, which the 2-rank harnesses install on every rank.
"""

import ast
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import nccl_rules
from dist_harness import free_port

REPO = Path(__file__).resolve().parent.parent
FACTORIES = {"tensor", "as_tensor", "scalar_tensor", "zeros", "ones", "empty", "full", "arange", "linspace", "eye",
             "rand", "randn", "randint", "randperm", "from_numpy", "frombuffer"}


def _host_factory(node):
    """True for a `torch.<factory>(...)` call without device=: a tensor that stays on the host under NCCL."""
    return (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
            and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
            and not any(k.arg == "device" for k in node.keywords))


def _functions(tree):
    return [f for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))]


def collective_wrappers(tree):
    """Names of the functions that hand their first parameter to a collective (training._all_reduce)."""
    wrappers = set()
    for f in _functions(tree):
        params = [a.arg for a in f.args.args]
        for call in (n for n in ast.walk(f) if isinstance(n, ast.Call)):
            if (_is_collective(call) and isinstance(call.args[0], ast.Name) and params
                    and call.args[0].id == params[0]):
                wrappers.add(f.name)
    return wrappers


def _is_collective(call):
    return (isinstance(call.func, ast.Attribute) and call.func.attr in nccl_rules.COLLECTIVES and call.args
            and isinstance(call.func.value, ast.Name) and call.func.value.id == "dist")


def _collective_args(tree, wrappers):
    """(function, tensor argument) of every collective call: dist.<collective>(t, ...), and calls of a wrapper,
    by its bare name or through its module (training._all_reduce(t, ...) from loop.py)."""
    found = []
    for f in _functions(tree):
        for call in (n for n in ast.walk(f) if isinstance(n, ast.Call)):
            name = call.func.id if isinstance(call.func, ast.Name) else getattr(call.func, "attr", None)
            if _is_collective(call) or (name in wrappers and call.args):
                found.append((f, call.args[0]))
    return found


def host_tensors_in_collectives(source, filename="<source>", wrappers=None):
    """'file:line: code' for each tensor that is built on the host and handed to a collective. wrappers: the
    collective wrappers of every module (None: this source's own)."""
    tree = ast.parse(source)
    offenders = []
    for function, arg in _collective_args(tree, collective_wrappers(tree) if wrappers is None else wrappers):
        values = [arg]
        if isinstance(arg, ast.Name):  # every value the function assigns to that name
            values = [n.value for n in ast.walk(function) if isinstance(n, ast.Assign)
                      and any(isinstance(t, ast.Name) and t.id == arg.id for t in n.targets)]
        for value in values:
            parts = value.elts if isinstance(value, (ast.List, ast.Tuple)) else [value]
            for node in (n for p in parts for n in ast.walk(p)):
                if _host_factory(node):
                    offenders.append(f"{filename}:{node.lineno}: {ast.get_source_segment(source, node)}")
    return offenders


def test_no_collective_in_nanochat_or_scripts_gets_a_host_tensor():
    paths = sorted([*REPO.glob("nanochat/*.py"), *REPO.glob("scripts/*.py")])
    wrappers = set().union(*(collective_wrappers(ast.parse(p.read_text())) for p in paths))
    assert "_all_reduce" in wrappers  # the check follows training's wrapper into loop.py's step
    offenders = []
    for path in paths:
        offenders += host_tensors_in_collectives(path.read_text(), str(path.relative_to(REPO)), wrappers)
    assert offenders == []


def test_the_static_check_flags_a_host_flag_and_passes_a_device_one():
    old = ("def f(last):\n"
           "    flag = torch.tensor(int(last))\n"
           "    dist.all_reduce(flag, op=dist.ReduceOp.MAX)\n"
           "def g(fits, device):\n"
           "    _all_reduce(torch.tensor(int(fits)), dist.ReduceOp.MIN)\n"
           "def _all_reduce(tensor, op):\n"
           "    dist.all_reduce(tensor, op=op)\n")
    assert host_tensors_in_collectives(old) == ["<source>:2: torch.tensor(int(last))", "<source>:5: torch.tensor(int(fits))"]
    # A wrapper from another module, called through it, as loop.py calls training._all_reduce.
    other = "def h(bad):\n    training._all_reduce(torch.tensor(int(bad)), dist.ReduceOp.MAX)\n"
    assert host_tensors_in_collectives(other, wrappers={"_all_reduce"}) == ["<source>:2: torch.tensor(int(bad))"]
    fixed = old.replace("int(last))", "int(last), device=device)").replace("int(fits))", "int(fits), device=device)")
    assert host_tensors_in_collectives(fixed) == []


@pytest.fixture
def one_rank_group(monkeypatch):
    """A gloo group of one process with the rules installed; the collectives are restored afterwards."""
    for name in nccl_rules.COLLECTIVES:
        monkeypatch.setattr(dist, name, getattr(dist, name))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    nccl_rules.install()
    yield
    dist.destroy_process_group()


def test_the_runtime_rule_tells_device_built_tensors_from_host_built_ones(one_rank_group):
    device = torch.device("cpu")
    dist.all_reduce(torch.tensor([1.0], device=device))
    dist.all_reduce(torch.zeros(2).to(device) + 1)  # moved to the device explicitly, then computed on
    dist.all_reduce(torch.ones(2, device=device).sum() * torch.tensor(2.0))  # a host scalar mixed into a device tensor
    for host in (torch.tensor(1), torch.tensor(1.0) * 2, torch.arange(3).float()):
        with pytest.raises(nccl_rules.NcclRuleError, match="built on the host without device="):
            dist.all_reduce(host)


def _data_horizon_on_rank(rank, world_size):
    from nanochat.loop import TrainLoop, TrainStep

    loop = TrainLoop(step=TrainStep(torch.nn.Linear(2, 2), None, 1), batches=None, horizon=lambda state: (0.5, rank == 1),
                     schedule=None, periodic=[], checkpointer=None, meter=None, wandb_run=None)
    return loop.progress(0)


@pytest.mark.slow  # spawns two interpreters
def test_data_horizon_all_reduces_a_flag_on_the_run_device(run_on_ranks):
    # On the old code: "dist.all_reduce got a tensor built on the host without device= ... nanochat/loop.py:71"
    assert run_on_ranks(_data_horizon_on_rank) == [(0.5, True), (0.5, True)]

