"""The sandbox: ordinary programs run; each layer stops what it is there to stop, and nothing outlives a run.

Every dangerous program here is bounded even if the sandbox failed: the fork loop forks 20 children from
one parent (not a doubling bomb), stray processes sleep 30 s at most, files go to fresh random names.
Kernel-layer tests use a path the audit hook does not see, and skip where the layer is not active.
"""

import json
import os
import select
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest

from lmforge import sandbox
from lmforge.common import LmforgeError
from lmforge.sandbox import BLOCKED_EXIT_CODE, SETUP_FAILED_EXIT_CODE, Limits, active_layers, run_many, run_python

MARKER = "lmforge-sandbox: blocked"
FAST = Limits(timeout_s=0.5)


def processes_in_session(sid: int) -> list[int]:
    """Pids whose session id is `sid`: the sandboxed child leads its own session, so this is all it started."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # exited while we looked
            continue
        fields = text[text.rindex(")") + 2:].split()  # state, ppid, pgrp, session, ...
        if int(fields[3]) == sid:
            found.append(int(stat.parent.name))
    return found


def needs(layer: str) -> None:
    if layer not in active_layers():
        pytest.skip(f"the {layer} layer is not active here")


def outside_path() -> Path:
    """A fresh name in the world-writable temp folder: only the audit layer keeps a dropped uid out of it."""
    return Path(tempfile.gettempdir()) / f"lmforge-sandbox-test-{uuid.uuid4().hex}"


# ----------------------------------------------------------------------------- ordinary programs

def test_runs_code_with_stdin_and_returns_stdout():
    r = run_python("name = input()\nprint('héllo', name[::-1])\n", stdin="abc\n")
    assert (r.returncode, r.reason, r.ok, r.timed_out) == (0, "ok", True, False)
    assert r.stdout == "héllo cba\n" and r.stderr == ""


def test_errors_are_normal_python_tracebacks():
    r = run_python("def f(:\n    pass\n")
    assert (r.returncode, r.reason) == (1, "error") and "SyntaxError" in r.stderr
    r = run_python("x = 1\n1 / 0\n")
    assert (r.returncode, r.reason) == (1, "error")
    assert 'File "<generated>", line 2' in r.stderr and "1 / 0" in r.stderr
    assert r.stderr.strip().endswith("ZeroDivisionError: division by zero")
    assert '"<string>"' not in r.stderr  # the bootstrap's own frames are trimmed off
    r = run_python("exit(3)")  # site's exit() is there although the child runs with -S
    assert (r.returncode, r.reason, r.ok) == (3, "error", False)


def test_doctest_testmod_counts_passing_and_failing_examples():
    code = '''
def add(a, b):
    """
    >>> add(1, 2)
    3
    >>> add(2, 2)
    5
    """
    return a + b

import doctest
print(doctest.testmod())
'''
    r = run_python(code)
    assert r.ok, r.stderr
    assert "TestResults(failed=1, attempted=2)" in r.stdout
    assert "Expected:\n    5\nGot:\n    4" in r.stdout


def test_threads_and_asyncio_still_work():
    # the seccomp filter allows clone only with CLONE_THREAD and sockets only AF_UNIX (asyncio's self-pipe)
    code = """
import asyncio, threading
out = []
threads = [threading.Thread(target=out.append, args=(i,)) for i in range(8)]
for t in threads: t.start()
for t in threads: t.join()
async def answer(): return 42
print(sorted(out), asyncio.run(answer()))
"""
    r = run_python(code)
    assert r.ok, r.stderr
    assert r.stdout == "[0, 1, 2, 3, 4, 5, 6, 7] 42\n"


def test_starts_in_an_empty_folder_that_is_writable_and_then_deleted():
    code = """
import os
print(os.getcwd(), os.listdir("."))
with open("out.txt", "w") as f: f.write("kept")
print(open("out.txt").read())
open(os.devnull, "w").write("dropped")
"""
    r = run_python(code)
    assert r.ok, r.stderr
    cwd, listing, content = r.stdout.split()
    assert listing == "[]" and content == "kept"
    assert not Path(cwd).exists()


def test_programs_that_read_the_system_still_work():
    # the landlock layer lets the child read only the Python installation, system libraries, /proc and a
    # few /etc files: what the stdlib reads on its own must be among them
    code = """
import inspect, json, mimetypes, os, sqlite3, tempfile, time, zlib, decimal
print(input(), open("/dev/stdin").read() == "typed\\n", mimetypes.guess_type("a.html")[0])
print(time.localtime().tm_year > 2000, os.cpu_count() > 0, "def dumps" in inspect.getsource(json))
print(open("/proc/self/status").read().startswith("Name:"), tempfile.mkdtemp().startswith(os.getcwd()))
"""
    r = run_python(code, stdin="typed\n")
    assert r.ok, r.stderr
    assert r.stdout == "typed True text/html\nTrue True True\nTrue True\n"


# ----------------------------------------------------------------------------- time

@pytest.mark.parametrize("code", ["while True: pass", "import time\ntime.sleep(100)"])
def test_wall_clock_timeout_kills_it(code):
    r = run_python(code, limits=FAST)
    assert (r.returncode, r.reason, r.timed_out, r.ok) == (None, "timeout", True, False)
    assert 0.5 <= r.seconds < 2.0


def test_cpu_limit_stops_a_busy_loop_long_before_the_wall_clock_limit():
    r = run_python("while True: pass", limits=Limits(cpu_s=1, timeout_s=20.0))
    assert (r.returncode, r.reason, r.timed_out) == (None, "timeout", True)
    assert r.seconds < 5


# ----------------------------------------------------------------------------- processes

SPAWNERS = {
    "fork loop": """
for _ in range(20):  # one parent forks at most 20 children: bounded even if fork were allowed
    if os.fork() == 0:
        time.sleep(30)
        os._exit(0)
""",
    "subprocess.run": "import subprocess\nsubprocess.run(['ls'])\n",
    "subprocess.Popen": "import subprocess\nsubprocess.Popen(['sleep', '30'])\n",
    "os.system": "os.system('sleep 30 &')\n",
}


@pytest.mark.parametrize("name", list(SPAWNERS))
def test_process_creation_is_blocked_and_nothing_survives(name):
    code = "import os, time\nprint(os.getpid(), flush=True)\n" + SPAWNERS[name] + "print('spawned')\n"
    r = run_python(code)
    assert (r.reason, r.returncode) == ("blocked", BLOCKED_EXIT_CODE) and MARKER in r.stderr
    assert "spawned" not in r.stdout
    assert processes_in_session(int(r.stdout.split()[0])) == []


def test_process_creation_the_audit_hook_cannot_see_fails_in_the_kernel():
    # multiprocessing.util.spawnv_passfds calls _posixsubprocess.fork_exec, which raises no audit event
    if "seccomp" not in active_layers():
        pytest.skip("the seccomp layer is not active here")
    code = """
import os
print(os.getpid(), flush=True)
from multiprocessing import util
util.spawnv_passfds(b"/bin/sleep", [b"/bin/sleep", b"30"], [])
print("spawned")
"""
    r = run_python(code)
    assert r.reason == "error" and "PermissionError: [Errno 1]" in r.stderr
    assert "spawned" not in r.stdout
    assert processes_in_session(int(r.stdout.split()[0])) == []


def test_signalling_another_process_is_blocked():
    r = run_python(f"import os\nos.kill({os.getpid()}, 0)\nprint('signalled')\n")
    assert r.reason == "blocked" and "os.kill" in r.stderr and "signalled" not in r.stdout


# ----------------------------------------------------------------------------- network

def test_network_is_blocked_and_nothing_reaches_a_local_listener():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        code = f"""
import socket
s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
s.connect(("127.0.0.1", {port}))
s.sendall(b"hello")
print("sent")
"""
        r = run_python(code)
        ready, _, _ = select.select([listener], [], [], 0.3)
    assert r.reason == "blocked" and MARKER in r.stderr and "sent" not in r.stdout
    assert ready == []  # no connection was ever made


def test_child_has_no_network_interfaces_up():
    if "netns" not in active_layers():
        pytest.skip("the network-namespace layer is not active here")
    # reading /proc/net/dev raises no network audit event: this is what the kernel layer alone gives
    r = run_python("print(open('/proc/net/dev').read())")
    assert r.ok, r.stderr
    interfaces = {line.split(":")[0].strip() for line in r.stdout.splitlines()[2:] if ":" in line}
    assert interfaces == {"lo"}


# ----------------------------------------------------------------------------- ctypes and files

@pytest.mark.parametrize("module", ["ctypes", "_ctypes", "ctypes.util"])
def test_importing_ctypes_is_blocked(module):
    r = run_python(f"import {module}\nprint('imported')\n")
    assert r.reason == "blocked" and MARKER in r.stderr and "imported" not in r.stdout


WRITES_OUTSIDE = {
    "open": "open({path!r}, 'w').write('x')",
    "os.open": "import os\nos.open({path!r}, os.O_WRONLY | os.O_CREAT)",
    "mkdir": "import os\nos.mkdir({path!r})",
    "through a symlink": "import os\nos.symlink({path!r}, 'link')\nopen('link', 'w').write('x')",
    "rename out": "import os\nopen('f', 'w').write('x')\nos.rename('f', {path!r})",
    "dir_fd": "import os\nfd = os.open({parent!r}, os.O_RDONLY)\nos.mkdir({name!r}, dir_fd=fd)",
    "sqlite3": "import sqlite3\nsqlite3.connect({path!r})",  # opens the file in C, after an audit event
}


@pytest.mark.parametrize("how", list(WRITES_OUTSIDE))
def test_writing_outside_the_folder_is_blocked(how):
    path = outside_path()
    r = run_python(WRITES_OUTSIDE[how].format(path=str(path), parent=str(path.parent), name=path.name))
    assert r.reason == "blocked" and MARKER in r.stderr
    assert not path.exists() and not path.is_symlink()


def test_dropped_uid_cannot_write_where_the_audit_hook_does_not_look(tmp_path):
    if "uid" not in active_layers():
        pytest.skip("the uid layer is not active here (the tests do not run as root)")
    # os.mkfifo raises no audit event; the kernel refuses a root-owned folder to the sandbox's own uid
    fifo = tmp_path / "fifo"
    r = run_python(f"import os\nprint(os.getuid())\nos.mkfifo({str(fifo)!r})\n")
    assert int(r.stdout.split()[0]) != 0
    assert r.reason == "error" and "PermissionError" in r.stderr
    assert not fifo.exists()


def test_files_only_their_owner_may_read_stay_unread(tmp_path):
    if "uid" not in active_layers():
        pytest.skip("without the uid layer the child is the tests' own user, who may read its own files")
    secret = tmp_path / "secret.txt"
    secret.write_text("the-secret-value")
    secret.chmod(0o600)
    r = run_python(f"print(open({str(secret)!r}).read())\nimport os\nprint(os.listdir({str(tmp_path)!r}))\n")
    assert not r.ok and "the-secret-value" not in r.stdout and "secret.txt" not in r.stdout
    r = run_python(f"import os\nprint(os.listdir({str(tmp_path)!r}))\n")
    assert not r.ok and "secret.txt" not in r.stdout


# ----------------------------------------------------------------------------- what only the kernel stops
# The audit hook sees only what raises an audit event, and runs in the program's own interpreter: C code
# that opens files itself, calls with no event, and a program that disarms or fools the hook get past it.
# These must still fail, in the kernel. Each program prints "started" first, so a test cannot pass
# because the program never got to try.

# Disarms the hook: empties its set of always-blocked events and its table of checks.
CLEAR_HOOK_TABLES = """
import gc
for table in gc.get_objects():
    if isinstance(table, set) and "os.fork" in table or isinstance(table, dict) and "os.remove" in table:
        table.clear()
"""
# Fools the hook: every path it resolves seems to lie inside the folder.
FOOL_HOOK = "import os\nos.path.realpath = lambda path, **kw: os.path.join(os.getcwd(), 'fooled')\n"

ESCAPES = {
    # a URI reads to the hook as a relative name, inside the folder
    "sqlite3 URI": "import sqlite3\nsqlite3.connect('file:{path}', uri=True).execute('create table t (x)')\n",
    "sqlite3 ATTACH": "import sqlite3\nc = sqlite3.connect(':memory:')\nc.execute(\"attach database '{path}' as a\")\n"
                      "c.execute('create table a.t (x)')\n",
    "os.mkfifo": "import os\nos.mkfifo({path!r})\n",
    "os.mknod": "import os, stat\nos.mknod({path!r}, stat.S_IFREG | 0o600)\n",
    "readline history": "import readline\nreadline.add_history('x')\nreadline.write_history_file({path!r})\n",
    "hook tables cleared through gc": CLEAR_HOOK_TABLES + "open({path!r}, 'w').write('x')\n",
    "hook fooled": FOOL_HOOK + "open({path!r}, 'w').write('x')\n",
}


def escape_program(how: str, path: Path) -> str:
    return "print('started', flush=True)\n" + ESCAPES[how].format(path=str(path))


def left_behind(path: Path) -> list[str]:
    """What a program made at `path` (sqlite adds -journal files beside a database)."""
    return sorted(p.name for p in path.parent.glob(path.name + "*"))


@pytest.mark.parametrize("how", list(ESCAPES))
def test_writes_the_audit_hook_misses_still_fail_outside_the_folder(how):
    needs("landlock")
    path = outside_path()
    try:
        r = run_python(escape_program(how, path))
        assert r.stdout.startswith("started"), r.stderr
        assert left_behind(path) == [], r.stderr
        assert r.reason in ("blocked", "error")
    finally:
        for name in left_behind(path):
            (path.parent / name).unlink()


@pytest.mark.parametrize("call", ["gc.get_objects()", "gc.get_referrers(os)", "gc.get_referents(os.path)"])
def test_the_hook_cannot_be_searched_for_through_gc(call):
    # what the gc program above uses to find the hook's tables; the kernel holds anyway, this reports it
    r = run_python(f"import gc, os\nfound = {call}\nprint('found')\n")
    assert r.reason == "blocked" and call.split("(")[0] in r.stderr and "found" not in r.stdout


def test_sqlite_in_the_folder_still_works():
    code = """
import sqlite3
for name in (":memory:", "db.sqlite"):
    c = sqlite3.connect(name)
    c.execute("create table t (x)")
    c.execute("insert into t values (42)")
    print(c.execute("select x from t").fetchone()[0])
    c.commit()
"""
    r = run_python(code)
    assert r.ok and r.stdout == "42\n42\n", r.stderr


# Reads outside the folder, each attempt reported on one line. The hook is fooled first, so the kernel
# alone answers. HOME and PLANTED are spliced in.
READS = FOOL_HOOK + """
def attempt(what, read):
    try:
        print(what, repr(read()))
    except OSError as e:
        print(what, "refused", type(e).__name__)

print("started")
attempt("environ", lambda: dict(os.environ))
attempt("own-environ", lambda: open("/proc/self/environ", "rb").read())
attempt("parent-environ", lambda: open(f"/proc/{os.getppid()}/environ", "rb").read())
attempt("planted", lambda: open(PLANTED).read())
attempt("home", lambda: os.listdir(HOME))
"""


def read_attempts(stdout: str) -> dict[str, str]:
    return dict(line.split(" ", 1) for line in stdout.splitlines()[1:] if " " in line)


def test_the_users_home_and_the_parents_environment_stay_unread():
    needs("landlock")
    home = Path.home()
    planted = home / f".lmforge-sandbox-test-{uuid.uuid4().hex}"
    secret = f"secret-{uuid.uuid4().hex}"
    planted.write_text(secret)
    planted.chmod(0o600)
    try:
        r = run_python(f"HOME, PLANTED = {str(home)!r}, {str(planted)!r}\n" + READS)
    finally:
        planted.unlink()
    assert r.ok and r.stdout.startswith("started"), r.stderr
    got = read_attempts(r.stdout)
    assert secret not in r.stdout and planted.name not in r.stdout
    assert got["planted"].startswith("refused") and got["home"].startswith("refused")
    assert got["parent-environ"].startswith("refused")
    # its own environment is the sandbox's minimal one, nothing of the parent's
    assert set(eval(got["environ"])) == {"PATH", "HOME", "TMPDIR", "LANG", "MALLOC_ARENA_MAX"}


# ----------------------------------------------------------------------------- a parent that is not root
# The same escapes from a parent that runs as an ordinary user: no uid change for the child, so the
# kernel's file permissions protect nothing of that user's own (their home, /tmp, their environment).

NOBODY = 65534
RUN_AS_PARENT = r"""
import json, sys
from lmforge.base import LmforgeError
from lmforge.sandbox import active_layers, run_python
try:
    layers = list(active_layers())
    results = [run_python(code) for code in json.load(sys.stdin)]
except LmforgeError as e:
    print(json.dumps({"refused": str(e)}))
else:
    print(json.dumps({"layers": layers, "results": [[r.reason, r.stdout, r.stderr] for r in results]}))
"""


@pytest.fixture(scope="module")
def as_ordinary_user():
    """Runs programs with run_python from a parent process that is not root: (layers, [(reason, stdout,
    stderr)]). As root, the parent is uid 65534 on an interpreter that user may run."""
    repo = Path(__file__).resolve().parents[1]
    drop = {"user": NOBODY, "group": NOBODY, "extra_groups": []} if os.geteuid() == 0 else {}
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(repo), "TMPDIR": tempfile.gettempdir(), "HOME": "/"}
    for python in (sys.executable, "/usr/bin/python3"):
        try:  # this tree's interpreter may sit under a home only root may enter
            if subprocess.run([python, "-c", "import lmforge.sandbox"], env=env, cwd="/", capture_output=True,
                              timeout=60, **drop).returncode == 0:
                break
        except OSError:
            pass
    else:
        pytest.skip("no interpreter here that an ordinary user may run with this checkout importable")

    def run(codes: list[str], **extra_env: str):
        done = subprocess.run([python, "-c", RUN_AS_PARENT], input=json.dumps(codes), env={**env, **extra_env},
                              cwd="/", capture_output=True, text=True, timeout=120, **drop)
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        if "refused" in report:
            pytest.skip(f"the sandbox refuses to run here: {report['refused']}")
        return report["layers"], report["results"]

    return run


def test_an_ordinary_users_parent_keeps_writes_in_the_folder(as_ordinary_user):
    paths = {how: outside_path() for how in ESCAPES}
    try:
        layers, results = as_ordinary_user([escape_program(how, path) for how, path in paths.items()])
        assert "uid" not in layers
        for (how, path), (reason, stdout, stderr) in zip(paths.items(), results):
            assert stdout.startswith("started"), (how, stderr)
            assert left_behind(path) == [] and reason in ("blocked", "error"), (how, stderr)
    finally:
        for path in paths.values():
            for name in left_behind(path):
                (path.parent / name).unlink()


def test_an_ordinary_users_home_and_environment_stay_unread(as_ordinary_user):
    home = Path(tempfile.mkdtemp(prefix="lmforge-sandbox-test-home-"))
    try:
        planted = home / "id_ed25519"
        secret = f"secret-{uuid.uuid4().hex}"
        planted.write_text(secret)
        planted.chmod(0o600)
        home.chmod(0o700)
        if os.geteuid() == 0:
            os.chown(home, NOBODY, NOBODY)
            os.chown(planted, NOBODY, NOBODY)
        code = f"HOME, PLANTED = {str(home)!r}, {str(planted)!r}\n" + READS
        _, [(reason, stdout, stderr)] = as_ordinary_user([code], HOME=str(home), LMFORGE_TEST_SECRET=secret)
    finally:
        for p in (home / "id_ed25519", home):
            if p.is_dir():
                p.rmdir()
            elif p.exists():
                p.unlink()
    assert reason == "ok" and stdout.startswith("started"), stderr
    got = read_attempts(stdout)
    assert secret not in stdout and "id_ed25519" not in stdout, stdout
    assert got["planted"].startswith("refused") and got["home"].startswith("refused")
    assert got["parent-environ"].startswith("refused")


# ----------------------------------------------------------------------------- memory and output

def test_memory_limit_gives_memory_error():
    r = run_python("b = bytearray(2 * 1024**3)\nprint('allocated')\n", limits=Limits(memory_mb=256))
    assert r.reason == "memory" and r.returncode == 1 and "allocated" not in r.stdout
    assert r.stderr.strip().endswith("MemoryError")


def test_file_size_limit():
    code = "try:\n    open('big', 'wb').write(b'x' * (2 << 20))\nexcept OSError as e:\n    print(e.errno)\n"
    r = run_python(code, limits=Limits(file_size_mb=1))
    assert r.ok and r.stdout == "27\n"  # EFBIG


def test_output_is_capped_without_blowing_up():
    code = "import sys\nsys.stdout.write('x' * 10_000_000)\nsys.stderr.write('é' * 5_000_000)\n"
    r = run_python(code, limits=Limits(max_output_bytes=1001))
    assert r.ok
    assert r.stdout == "x" * 1001
    assert r.stderr == "é" * 500 + "\ufffd"  # 1001 bytes: the last 'é' is cut in half


# ----------------------------------------------------------------------------- batches, limits, layers

def test_run_many_keeps_order_and_runs_in_parallel():
    sleeps = [0.8, 0.6, 0.4, 0.2]  # the first finishes last
    codes = [f"import time\ntime.sleep({s})\nprint({i})" for i, s in enumerate(sleeps)]
    t0 = time.monotonic()
    results = run_many(codes, workers=4)
    elapsed = time.monotonic() - t0
    assert [r.stdout for r in results] == ["0\n", "1\n", "2\n", "3\n"]
    assert all(r.ok for r in results)
    assert elapsed < 0.8 * sum(sleeps)  # one at a time would take at least sum(sleeps)
    assert run_many([]) == []


def test_bad_limits_and_arguments_are_user_errors():
    with pytest.raises(LmforgeError, match="timeout_s"):
        Limits(timeout_s=0)
    with pytest.raises(LmforgeError, match="memory_mb"):
        Limits(memory_mb=8)
    with pytest.raises(LmforgeError, match="workers"):
        run_many(["pass"], workers=0)
    with pytest.raises(LmforgeError, match="str"):
        run_python(b"print(1)")


def test_active_layers():
    layers = active_layers()
    assert {"session", "tempdir", "rlimits", "audit"} <= set(layers)
    assert set(layers) <= {"session", "tempdir", "netns", "uid", "landlock", "seccomp", "rlimits", "audit"}


def test_a_missing_kernel_layer_refuses_to_run_unless_the_user_opts_in(monkeypatch):
    here = active_layers()
    monkeypatch.setattr(sandbox, "active_layers", lambda: tuple(layer for layer in here if layer != "seccomp"))
    monkeypatch.delenv("LMFORGE_SANDBOX_ALLOW_WEAK", raising=False)
    with pytest.raises(LmforgeError, match=r"seccomp.*Limits\(allow_weak=True\).*LMFORGE_SANDBOX_ALLOW_WEAK=1"):
        run_python("print(1)")
    with pytest.raises(LmforgeError, match="seccomp"):
        run_many(["print(1)", "print(2)"])
    assert run_python("print(1)", limits=Limits(allow_weak=True)).stdout == "1\n"
    monkeypatch.setenv("LMFORGE_SANDBOX_ALLOW_WEAK", "1")
    assert [r.stdout for r in run_many(["print(1)", "print(2)"])] == ["1\n", "2\n"]
    monkeypatch.setenv("LMFORGE_SANDBOX_ALLOW_WEAK", "0")  # only "1" opts in
    with pytest.raises(LmforgeError, match="seccomp"):
        run_python("print(1)")


def test_a_layer_that_does_not_take_in_one_run_stops_that_run(monkeypatch):
    # the probe is measured once; each child checks again, and runs nothing without every required layer
    here = active_layers()
    monkeypatch.setattr(sandbox, "KERNEL_LAYERS", sandbox.KERNEL_LAYERS + ("imaginary",))
    monkeypatch.setattr(sandbox, "active_layers", lambda: here + ("imaginary",))
    r = run_python("print('ran')")
    assert r.returncode == SETUP_FAILED_EXIT_CODE and r.reason == "error"
    assert r.stdout == "" and "imaginary" in r.stderr
