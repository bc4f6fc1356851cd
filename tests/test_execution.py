"""The execution sandbox against a battery of hostile and broken programs (nanochat/execution.py).

Every test starts real child interpreters; the whole file runs in a few seconds. Tests that try to get
around the in-process guard with ctypes only run where the kernel layer that stops them is active
(`sandbox_layers()` is the capability probe), because without it they would really do the damage.
"""

import logging
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from nanochat import execution
from nanochat.execution import ExecutionResult, execute_code, sandbox_layers


@pytest.fixture(scope="module")
def layers():
    return sandbox_layers()


def require(layers, name):
    if not layers[name].startswith("on"):
        pytest.skip(f"kernel layer {name} not available here: {layers[name]}")


@pytest.fixture
def victim():
    """A process the sandbox must not be able to touch; stands in for 'the parent' in bypass attempts."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def run(code, **kwargs):
    return execute_code(textwrap.dedent(code), **kwargs)


# -----------------------------------------------------------------------------
# Ordinary programs


def test_success_captures_stdout():
    result = run("print('hello world')")
    assert result.success and result.stdout == "hello world\n" and result.error is None
    assert not result.timeout and not result.memory_exceeded


def test_exception_is_reported_with_type_and_message():
    result = run("1/0")
    assert not result.success and not result.timeout
    assert result.error == "ZeroDivisionError: division by zero"
    assert "Traceback" in result.stderr and "<llm>" in result.stderr


def test_syntax_error_is_reported():
    result = run("def broken(:\n    pass")
    assert not result.success and not result.timeout
    assert result.error.startswith("SyntaxError")


def test_runs_as_main_with_fresh_globals():
    result = run("""
        if __name__ == "__main__":
            print("main", 'GUARD' in dir(), '_CONFIG' in dir())
    """)
    assert result.success and result.stdout == "main False False\n"


def test_tricky_strings_survive_embedding():
    code = 'print("a \\"quoted\\" {brace} \\\\ back", \'single\', """triple""", "naïve 你好")'
    result = execute_code(code)
    assert result.success, result
    assert result.stdout == 'a "quoted" {brace} \\ back single triple naïve 你好\n'


def test_sys_exit_zero_passes_and_nonzero_fails():
    assert execute_code("import sys; print('x'); sys.exit(0)").success
    result = execute_code("import sys; sys.exit(3)")
    assert not result.success and result.error == "SystemExit: 3"


def test_early_os_exit_zero_is_not_a_pass():
    # A HumanEval completion that exits before check() runs must not count as passing.
    result = execute_code("import os; os._exit(0)\nraise AssertionError('check never ran')")
    assert not result.success and not result.timeout


def test_threads_still_work():
    result = run("""
        import threading
        out = []
        t = threading.Thread(target=out.append, args=(42,))
        t.start(); t.join()
        print(out)
    """)
    assert result.success and result.stdout == "[42]\n"


def test_stdin_is_closed():
    result = execute_code("input()")
    assert not result.success and "EOFError" in result.error


def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("FAKE_SECRET_KEY", "hunter2")
    result = execute_code("import os; print('FAKE_SECRET_KEY' in os.environ)")
    assert result.success and result.stdout == "False\n"


def test_writes_land_in_a_temp_dir_that_is_removed(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run("""
        import os, tempfile
        with open('landmine.txt', 'w') as f:
            f.write('x')
        print(open('landmine.txt').read())
        print(tempfile.mkdtemp().startswith(os.getcwd()))
        print(os.getcwd())
    """)
    assert result.success, result
    assert result.stdout.splitlines()[:2] == ["x", "True"]
    assert not (tmp_path / "landmine.txt").exists()
    assert not os.path.exists(result.stdout.splitlines()[2])


def test_bad_arguments_are_rejected_clearly():
    with pytest.raises(ValueError, match="timeout"):
        execute_code("pass", timeout=0)
    with pytest.raises(ValueError, match="maximum_memory_bytes"):
        execute_code("pass", maximum_memory_bytes=-1)
    with pytest.raises(ValueError, match="code must be a str"):
        execute_code(b"pass")


def test_repr_shows_only_interesting_fields():
    assert repr(ExecutionResult(True, "hi\n", "")) == "ExecutionResult(success=True, stdout='hi\\n', stderr='')"
    assert "timeout=True" in repr(ExecutionResult(False, "", "", error="e", timeout=True))


# -----------------------------------------------------------------------------
# Resource exhaustion


def test_infinite_loop_times_out_promptly():
    start = time.monotonic()
    result = execute_code("while True:\n    pass", timeout=1.0)
    assert result.timeout and not result.success
    assert result.error == "Execution timed out (process killed)"
    assert time.monotonic() - start < 4.0


def test_memory_hog_is_reported_as_memory_exceeded():
    result = execute_code("x = bytearray(1 << 30)")
    assert not result.success and result.memory_exceeded and not result.timeout
    result = execute_code("chunks = []\nwhile True:\n    chunks.append(b'x' * (1 << 22))")
    assert not result.success and result.memory_exceeded and not result.timeout


def test_no_memory_limit_is_allowed():
    # mar26 crashed when maximum_memory_bytes was None.
    result = execute_code("x = bytearray(300 * 1024 * 1024); print(len(x))", maximum_memory_bytes=None)
    assert result.success and result.stdout == f"{300 * 1024 * 1024}\n"


def test_recursion_bomb_is_a_recursion_error_not_a_timeout():
    result = execute_code("def f():\n    return f()\nf()")
    assert not result.success and not result.timeout
    assert result.error.startswith("RecursionError")


def test_deep_recursion_with_raised_limit_fails_without_timeout():
    # Runs until the address space is full (a small cap keeps it quick), then dies however CPython dies.
    result = execute_code("import sys\nsys.setrecursionlimit(10**7)\ndef f(n):\n    return f(n + 1)\nf(0)", timeout=10,
                          maximum_memory_bytes=64 * 1024 * 1024)
    assert not result.success and not result.timeout


@pytest.mark.parametrize("stream", ["stdout", "stderr"])
def test_output_flood_is_capped_and_returns_promptly(stream):
    start = time.monotonic()
    result = execute_code(f"import sys\nwhile True:\n    print('x' * 1000, file=sys.{stream})", timeout=10,
                          max_output_bytes=256 * 1024)
    assert time.monotonic() - start < 5.0
    assert not result.success and result.output_truncated and not result.timeout
    assert len(getattr(result, stream)) <= 256 * 1024


def test_single_huge_write_is_capped():
    result = execute_code("import sys\nsys.stdout.write('y' * 100_000_000)", max_output_bytes=100_000)
    assert result.output_truncated and len(result.stdout) == 100_000


# -----------------------------------------------------------------------------
# Crashes are crashes, not timeouts (mar26 reported a dead child as timeout=True)


def test_abort_is_reported_as_crash():
    result = execute_code("import os\nos.abort()")
    assert not result.success and not result.timeout
    assert "SIGABRT" in result.error


def test_segfault_is_reported_as_crash():
    result = execute_code("import ctypes\nctypes.string_at(0)")
    assert not result.success and not result.timeout
    assert "SIGSEGV" in result.error


# -----------------------------------------------------------------------------
# Destructive operations


@pytest.mark.parametrize("code", [
    "import os; os.system('true')",
    "import shutil; shutil.rmtree('/tmp')",
    "import subprocess; subprocess.Popen(['ls'])",
    "import subprocess; subprocess.run(['ls'])",
    "import os; os.fork()",
    "import os; os.execv('/bin/true', ['true'])",
    "import os; os.chmod('/tmp', 0o777)",
    "import resource",
])
def test_destructive_functions_are_disabled(code):
    result = execute_code(code)
    assert not result.success and not result.timeout


def test_killing_the_parent_is_blocked(victim):
    # If this failed, pytest itself would be gone.
    result = execute_code("import os\nos.kill(os.getppid(), 9)")
    assert not result.success and "TypeError" in result.error
    result = execute_code("import os\nos.killpg(os.getpgid(os.getppid()), 9)")
    assert not result.success
    result = execute_code(f"import os\nos.kill({victim.pid}, 9)")
    assert not result.success
    time.sleep(0.1)
    assert alive(victim.pid)


def test_fork_bomb_is_contained():
    start = time.monotonic()
    result = execute_code("import os\nwhile True:\n    os.fork()")
    assert not result.success and not result.timeout
    assert time.monotonic() - start < 5.0


def test_files_outside_the_work_dir_survive(tmp_path):
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("precious")
    attempts = [
        f"open({str(sentinel)!r}, 'w').write('pwned')",
        f"open({str(sentinel)!r}, 'a').write('pwned')",
        f"import os; os.remove({str(sentinel)!r})",
        f"import os; os.unlink({str(sentinel)!r})",
        f"import os; os.rename({str(sentinel)!r}, 'stolen.txt')",
        f"import os; os.truncate({str(sentinel)!r}, 0)",
        f"import pathlib; pathlib.Path({str(sentinel)!r}).unlink()",
        f"import pathlib; pathlib.Path({str(sentinel)!r}).write_text('pwned')",
        f"import shutil; shutil.rmtree({str(tmp_path)!r})",
        f"import os; fd = os.open({str(sentinel)!r}, os.O_WRONLY | os.O_TRUNC); os.write(fd, b'pwned')",
        f"open({str(tmp_path / 'new.txt')!r}, 'w').write('x')",
        f"import os; os.symlink({str(sentinel)!r}, 'link'); open('link', 'w').write('pwned')",
    ]
    for code in attempts:
        result = execute_code(code)
        assert not result.success, code
        assert sentinel.read_text() == "precious", code
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sentinel.txt"]


def test_network_is_blocked():
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        for code in [f"import socket; socket.create_connection(('127.0.0.1', {port}), timeout=1)",
                     f"import socket; s = socket.socket(); s.connect(('127.0.0.1', {port}))",
                     "import urllib.request; urllib.request.urlopen('http://127.0.0.1:1/', timeout=1)"]:
            result = execute_code(code)
            assert not result.success, code
            assert "PermissionError" in result.error or "URLError" in result.error, result
        server.settimeout(0.2)
        with pytest.raises(socket.timeout):
            server.accept()


# -----------------------------------------------------------------------------
# Bypass attempts through ctypes: only the kernel layers stop these


def test_ctypes_kill_is_blocked_by_the_kernel(layers, victim):
    require(layers, "seccomp")
    result = execute_code(f"import ctypes\nprint(ctypes.CDLL(None).kill({victim.pid}, 9))")
    assert result.success and result.stdout == "-1\n"
    time.sleep(0.1)
    assert alive(victim.pid)


def test_ctypes_fork_is_blocked_by_the_kernel(layers):
    require(layers, "seccomp")
    result = execute_code("import ctypes\nlibc = ctypes.CDLL(None)\nprint([libc.fork() for _ in range(5)])")
    assert result.success and result.stdout == "[-1, -1, -1, -1, -1]\n"


def test_raw_socket_is_blocked_by_the_kernel(layers):
    require(layers, "seccomp")
    # socket.socket's base class is the original _socket.socket, which the Python guard can't replace.
    result = execute_code("import socket\nraw = socket.socket.__mro__[2]\nraw()")
    assert not result.success and "PermissionError" in result.error


def test_ctypes_unlink_outside_is_blocked_by_the_kernel(layers, tmp_path):
    require(layers, "landlock")
    sentinel = tmp_path / "sentinel.txt"
    sentinel.write_text("precious")
    result = execute_code(f"import ctypes\nprint(ctypes.CDLL(None).unlink({str(sentinel).encode()!r}))\n"
                          f"import _io\n_io.open({str(tmp_path / 'x')!r}, 'w')")
    assert result.stdout == "-1\n" and "PermissionError" in result.error
    assert sentinel.read_text() == "precious" and not (tmp_path / "x").exists()


def test_escaped_descendants_are_killed_with_the_session():
    # Kernel layers off so that fork works: the session kill is the last line of defence.
    code = textwrap.dedent("""
        import ctypes, os, time
        pid = ctypes.CDLL(None).fork()
        if pid == 0:
            time.sleep(60)
        print(pid, flush=True)
    """)
    start = time.monotonic()
    result, layers = execution._spawn_and_collect(code, 10.0, None, 1 << 20, kernel_layers=False)
    assert layers["seccomp"].startswith("unavailable")
    assert time.monotonic() - start < 5.0  # the grandchild holding the pipes open is not waited for
    grandchild = int(result.stdout.split()[0])
    assert grandchild > 0
    deadline = time.monotonic() + 2.0
    while alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not alive(grandchild)


def test_missing_layers_are_warned_about_once(caplog):
    with caplog.at_level(logging.WARNING, logger="nanochat"):
        fake = {"rlimits": "on", "seccomp": "unavailable: test-only reason"}
        execution._warn_missing_layers(fake)
        execution._warn_missing_layers(fake)
    messages = [r.getMessage() for r in caplog.records if "test-only reason" in r.getMessage()]
    assert len(messages) == 1 and "seccomp" in messages[0]


def test_sandbox_layers_reports_every_layer(layers):
    assert set(layers) == {"rlimits", "landlock", "capabilities", "seccomp", "python_guard"}
    assert layers["python_guard"] == "on" and layers["rlimits"] == "on"


# -----------------------------------------------------------------------------
# Reads, disk and namespaces


def test_files_outside_the_sandbox_cannot_be_read(layers, tmp_path):
    require(layers, "landlock")  # Landlock's read rights are in every ABI (Linux >= 5.13)
    secret = tmp_path / "secret.txt"
    secret.write_text("the launch codes")
    result = execute_code(f"print(open({str(secret)!r}).read())")
    assert not result.success and "PermissionError" in result.error and "launch codes" not in result.stdout
    # Through libc directly, around Python's open(): refused by the kernel all the same.
    result = execute_code(f"import ctypes\nprint(ctypes.CDLL(None).open({str(secret).encode()!r}, 0))")
    assert result.success and result.stdout == "-1\n"
    # What programs need still reads: the standard library, installed packages, their own files.
    result = execute_code("import json, numpy, sqlite3, decimal\nopen('mine.txt', 'w').write('hi')\n"
                          "print(open('mine.txt').read(), numpy.arange(3).sum())")
    assert result.success and result.stdout == "hi 3\n", result


def test_the_total_written_is_capped():
    # Each file under the per-file cap, together four times the total: the program is killed and fails.
    code = "for i in range(32):\n    open(f'f{i}', 'wb').write(b'x' * (8 << 20))\nprint('wrote 256 MiB')"
    result = execute_code(code, timeout=20)  # the default total: 64 MiB
    assert not result.success and result.error.startswith("Disk limit exceeded (more than 67108864 bytes")
    result = execute_code("open('f', 'wb').write(b'x' * (4 << 20))\nprint('ok')", maximum_disk_bytes=8 << 20)
    assert result.success and result.stdout == "ok\n"
    result = execute_code("open('f', 'wb').write(b'x' * (4 << 20))\nprint('ok')", maximum_disk_bytes=2 << 20)
    assert not result.success  # one file past the total: the per-file rlimit stops it at once
    result = execute_code("for i in range(20_000):\n    open(f'f{i}', 'w').close()", timeout=20)
    assert not result.success and "10000 files" in result.error


def test_new_namespaces_are_refused(layers):
    require(layers, "seccomp")
    code = textwrap.dedent("""
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        for flag in (0x10000000, 0x20000, 0x40000000):  # CLONE_NEWUSER, CLONE_NEWNS, CLONE_NEWNET
            print(libc.unshare(flag), os.strerror(ctypes.get_errno()))
        print(libc.setns(0, 0), os.strerror(ctypes.get_errno()))
    """)
    result = execute_code(code)
    assert result.success and result.stdout == "-1 Operation not permitted\n" * 4, result
