"""Budgets that keep the package cheap to import: importing any module of nanochat/, scripts/ and tasks/
creates no files, starts no threads, touches no base dir and leaves torch._dynamo unloaded (its import alone
costs seconds, so only code that compiles may pull it in)."""

import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROBE = r"""
import importlib, os, pkgutil, sys, threading
before_threads = threading.active_count()
names = []
for package in ("nanochat", "scripts", "tasks"):
    pkg = importlib.import_module(package)
    names += [f"{package}.{m.name}" for m in pkgutil.iter_modules(pkg.__path__)]
for name in names:
    importlib.import_module(name)
print("modules", len(names))
print("threads", threading.active_count() - before_threads)
print("dynamo", "torch._dynamo" in sys.modules)
"""


def test_importing_every_module_is_side_effect_free(tmp_path):
    home, base, cwd = tmp_path / "home", tmp_path / "base", tmp_path / "cwd"
    for d in (home, cwd):
        d.mkdir()
    env = dict(os.environ, HOME=str(home), NANOCHAT_BASE_DIR=str(base), PYTHONPATH=REPO_ROOT)
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    assert int(lines["modules"]) > 30
    assert lines["threads"] == "0"
    assert lines["dynamo"] == "False"
    assert not base.exists() and not os.listdir(cwd)
    assert not any(name != ".cache" or os.listdir(home / ".cache") for name in os.listdir(home)), os.listdir(home)
