"""Run model-generated Python in a throw-away child process with time, memory, process and network limits.

Code-task rewards (does the answer parse, do its doctests pass) have to *run* what a policy wrote, and a
policy under RL pressure writes whatever scores: infinite loops, fork bombs, `rm -rf`, network calls.
`run_python` runs one program in a fresh interpreter and reports what happened as a `SandboxResult`
(`reason` is "ok", "error", "timeout", "memory", "blocked" or "killed"); `run_many` runs a batch on a
thread pool, order kept. The sandbox is Linux only.

The layers, outermost first. Each stops something the others may miss; `active_layers()` says which
took on this machine. The kernel ones (`KERNEL_LAYERS`: netns, landlock, seccomp) need privileges or
kernel features a container may lack: without one, `run_python` and `run_many` refuse with an
LmforgeError that names it, unless the user accepts the weaker sandbox (`Limits(allow_weak=True)` or
LMFORGE_SANDBOX_ALLOW_WEAK=1). Each child checks them again and runs nothing if one did not take.

  session   The child leads a new session (`start_new_session`), so the parent kills its whole process
            group with SIGKILL on timeout and again after every exit: nothing it started outlives it.
  tempdir   It starts in an empty temporary folder (deleted afterwards) with a minimal environment (PATH,
            HOME and TMPDIR = the folder, LANG, MALLOC_ARENA_MAX: nothing of the parent's), on
            `python -I -S -B`: no user site, no site-packages, no PYTHON* variables, no .pyc writes; only
            the standard library is importable. Output comes back through pipes the parent drains into
            buffers capped at `max_output_bytes`, so a program printing gigabytes costs no memory.
  rlimits   RLIMIT_CPU (SIGXCPU), RLIMIT_AS (MemoryError), RLIMIT_FSIZE (per file), RLIMIT_CORE=0,
            RLIMIT_NOFILE, and RLIMIT_NPROC where the child has a uid of its own (for root NPROC is not
            enforced at all, and for a shared uid it would count the user's other processes). Wall clock
            is the parent's job.
  netns     `unshare(CLONE_NEWNET)` (root) or `CLONE_NEWUSER | CLONE_NEWNET` (others): the child sees a
            network namespace whose only interface, `lo`, is down. No packet leaves it, 127.0.0.1
            included, whatever the audit layer misses. (In its own user namespace, a non-root child also
            cannot read the parent's /proc/<pid>/environ or memory.)
  uid       When started as root, the child moves to a fresh random uid (falling back to 65534), so the
            kernel refuses writes to files it does not own, signals to other processes, and privileged
            calls. It keeps one capability, CAP_DAC_READ_SEARCH, only when the interpreter's stdlib is not
            world-readable (a pyenv under a 0700 /root): so it can import the stdlib, at the price that
            file permissions then let it read any file; the landlock layer narrows reads back down.
            Not a required layer: a child of an ordinary user stays that user, and landlock confines it.
  landlock  A Landlock ruleset (unprivileged; Linux >= 5.13), set after the uid change and before
            seccomp, for the child and anything it could start. Writes of any kind (create, write,
            truncate, delete, rename, link, mkdir, mkfifo, mknod, bind a socket file) only inside the
            folder, and to /dev/null; reads only of the folder, the Python installation, system library
            trees (/usr, /lib*), /proc, stdin and a few named files (/etc/ld.so.cache, localtime,
            mime.types, passwd, group, ...); nothing executed. So C code that opens files itself
            (sqlite3, readline) and a program that fools the audit hook stay in the folder, and the user's
            home, other users' files and world-readable files elsewhere stay unread, root or not. It also
            refuses ptrace-mode access (/proc/<pid>/environ, mem) to processes outside the sandbox, and
            on ABI >= 4 TCP bind/connect, on ABI >= 6 signals and abstract unix sockets out of it.
  seccomp   (x86_64) A kernel filter that fails fork/vfork/clone-without-CLONE_THREAD, execve,
            non-AF_UNIX sockets, signals to other processes, TIOCSTI terminal injection, ptrace,
            namespaces, io_uring, bpf and perf events with EPERM. Threads still work (clone3 answers
            ENOSYS, so glibc falls back to clone, whose flags the filter can read). It cannot be removed
            once installed, so it holds even if the audit layer is bypassed.
  audit     A `sys.addaudithook` installed before the user code runs ends the child (stderr marker
            "lmforge-sandbox: blocked <event>", exit code `BLOCKED_EXIT_CODE`, reason "blocked") on:
            process creation (os.fork/forkpty/system/exec/posix_spawn, subprocess.Popen, pty.spawn),
            network (non-AF_UNIX sockets, connect, bind, sendto, name lookups), ctypes (importing it,
            dlopen, calling foreign functions), signals to other processes, raising rlimits, ioctl, gc's
            object walks (get_objects/get_referrers/get_referents: the way to the hook's own tables, which
            are immutable besides), sqlite extensions, and writes outside the temporary folder (open for
            writing, remove, rename, link, mkdir, chmod, sqlite3.connect, ...; symlinks and dir_fd are
            resolved first). Reads stay allowed, except of devices other than /dev/null, zero, (u)random
            and std streams; of directory descriptors outside the folder (for `dir_fd=` calls); and,
            where the child kept CAP_DAC_READ_SEARCH, of files and listings outside the Python
            installation that any user could not read (/etc/shadow, ~/.ssh). It names what a program
            tried; the kernel layers are what enforce: the hook sees only calls that raise an audit
            event (not os.mkfifo, sqlite's ATTACH, readline's history file), and a program can fool it
            from inside (it calls os.path functions the program may replace).

What this is not: a security boundary against a determined attacker, the way a VM or gVisor is. The
audit hook is bypassable from inside (PEP 578) and is there to report; everything shares one kernel,
whose bugs are the way out of every layer here; a symlink swapped between the hook's check and the open
is a race the hook loses (the landlock layer does not); the child may still connect to unix sockets in
the filesystem that its uid may open (the audit layer alone refuses connect: Landlock, up to ABI 7,
has no right for it); total disk use is bounded only by time x RLIMIT_FSIZE per file; and with
allow_weak, where a kernel layer is missing, the rest is all there is. It is meant to make the mistakes
and reward hacks of a language model harmless, and to report them.
"""

from __future__ import annotations

import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from lmforge.base import LmforgeError  # not lmforge.common: the sandbox needs no torch

# The child's exit code when the audit hook ends it. A program that calls sys.exit(199) itself reads as
# blocked too: that can only make its own result worse, so it is not worth a second channel.
BLOCKED_EXIT_CODE = 199
# The child's exit code when it cannot set its own limits up (a bug or an unusual kernel, not the code),
# or when a required kernel layer did not take in this run.
SETUP_FAILED_EXIT_CODE = 198
# The kernel layers without which the sandbox refuses to run, and what each one needs from the machine.
KERNEL_LAYERS = ("netns", "seccomp", "landlock")
_LAYER_NEEDS = {
    "netns": "root or unprivileged user namespaces (sysctl user.max_user_namespaces > 0)",
    "seccomp": "seccomp filters on x86_64",
    "landlock": "Landlock: Linux >= 5.13 with landlock in the boot-time LSM list (lsm=)",
}
# Set to "1" to run even where a kernel layer is missing, as Limits(allow_weak=True) does.
ALLOW_WEAK_ENV = "LMFORGE_SANDBOX_ALLOW_WEAK"


@dataclass
class SandboxResult:
    returncode: int | None  # None when killed by a signal
    stdout: str  # utf-8, errors="replace", at most max_output_bytes of it
    stderr: str
    timed_out: bool  # wall-clock or CPU limit hit
    reason: str  # "ok", "error", "timeout", "memory", "blocked", "killed"
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.reason == "ok"


@dataclass(frozen=True)
class Limits:
    timeout_s: float = 5.0  # wall clock, measured by the parent
    cpu_s: int = 5  # RLIMIT_CPU
    memory_mb: int = 512  # RLIMIT_AS: address space, so a little above what the program may touch
    max_output_bytes: int = 64_000  # per stream; the rest is read and dropped
    file_size_mb: int = 8  # RLIMIT_FSIZE: the largest file the program may write
    allow_weak: bool = False  # run even where a layer of KERNEL_LAYERS is missing (or set ALLOW_WEAK_ENV=1)

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise LmforgeError(f"Limits(timeout_s={self.timeout_s}): the wall-clock limit must be > 0 seconds")
        if self.cpu_s < 1:
            raise LmforgeError(f"Limits(cpu_s={self.cpu_s}): RLIMIT_CPU counts whole seconds; use 1 or more")
        if self.memory_mb < 64:
            raise LmforgeError(f"Limits(memory_mb={self.memory_mb}): the interpreter alone needs ~30 MB of "
                               "address space; use 64 or more")
        if self.max_output_bytes < 0 or self.file_size_mb < 0:
            raise LmforgeError(f"Limits(max_output_bytes={self.max_output_bytes}, file_size_mb="
                               f"{self.file_size_mb}): sizes cannot be negative")


# ----------------------------------------------------------------------------- the child
# Run as `python -I -S -B -X utf8 -c _BOOTSTRAP <config json>`, in the empty folder. It reads the program,
# sets the kernel layers up while it is still trusted code (setup order matters: the network namespace
# needs root, which the uid change gives up; Landlock needs no_new_privs, or root; the seccomp filter
# forbids unshare), checks that the required ones took, forgets ctypes, installs
# the audit hook, then runs the program as `__main__`. A string, not a module of lmforge: under -I -S the
# package is not importable, and the child should import as little as possible before the hook.
_BOOTSTRAP = r'''
import json, os, sys

AF_UNIX = 1
CLONE_NEWNET, CLONE_NEWUSER, CLONE_THREAD = 0x40000000, 0x10000000, 0x00010000
PR_SET_KEEPCAPS, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 8, 38, 22, 2
CAP_DAC_READ_SEARCH, CAPABILITY_VERSION_3 = 2, 0x20080522
EPERM, ENOSYS = 1, 38


def setup(cfg):
    """The kernel layers. Returns the names of those that took, and whether the child kept
    CAP_DAC_READ_SEARCH (then the audit hook narrows reads to what any user may read)."""
    import ctypes, resource
    libc = ctypes.CDLL(None, use_errno=True)
    zero = ctypes.c_ulong(0)  # prctl is variadic: pass unused arguments as full-width zeros
    layers = ["session", "tempdir"]
    as_root = os.geteuid() == 0
    # Root takes a bare network namespace: inside a new user namespace it would lose its capabilities on
    # the host (no uid change, no reading a 0700 stdlib) yet stay uid 0 to the filesystem.
    if libc.unshare(CLONE_NEWNET if as_root else CLONE_NEWUSER | CLONE_NEWNET) == 0:
        layers.append("netns")
    own_uid, read_cap = drop_root(ctypes, libc, zero, cfg["work"]) if as_root else (False, False)
    if own_uid:
        layers.append("uid")
    no_new_privs = libc.prctl(PR_SET_NO_NEW_PRIVS, ctypes.c_ulong(1), zero, zero, zero) == 0
    # Landlock after the uid change (it needs no_new_privs, not root) and before seccomp
    if no_new_privs and landlock(ctypes, libc, cfg["work"]):
        layers.append("landlock")
    if no_new_privs and seccomp(ctypes, libc, zero):
        layers.append("seccomp")

    def lower(res, soft, hard=None):
        hard = soft if hard is None else hard
        _, old_hard = resource.getrlimit(res)
        if old_hard != resource.RLIM_INFINITY:  # a non-root child cannot raise a hard limit
            soft, hard = min(soft, old_hard), min(hard, old_hard)
        resource.setrlimit(res, (soft, hard))

    lower(resource.RLIMIT_CPU, cfg["cpu_s"], cfg["cpu_s"] + 1)  # SIGXCPU, then SIGKILL a second later
    lower(resource.RLIMIT_AS, cfg["memory_mb"] << 20)
    lower(resource.RLIMIT_FSIZE, cfg["file_size_mb"] << 20)
    lower(resource.RLIMIT_CORE, 0)
    lower(resource.RLIMIT_NOFILE, 256)
    if own_uid:  # counts this uid's threads machine-wide: exact only for a uid of its own
        lower(resource.RLIMIT_NPROC, 64)
    layers.append("rlimits")
    return layers, read_cap


def drop_root(ctypes, libc, zero, work):
    """Move to a uid of our own: (moved, kept CAP_DAC_READ_SEARCH). Not moved leaves us root."""
    stdlib = os.path.dirname(os.__file__)
    parts = [stdlib]
    while parts[-1] != os.path.dirname(parts[-1]):
        parts.append(os.path.dirname(parts[-1]))
    readable = os.stat(stdlib).st_mode & 0o004 and all(os.stat(p).st_mode & 0o001 for p in parts)
    for uid in (2_000_000_000 + int.from_bytes(os.urandom(3), "little"), 65534):
        try:
            os.chown(work, uid, uid)
            if not readable:
                libc.prctl(PR_SET_KEEPCAPS, ctypes.c_ulong(1), zero, zero, zero)
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        except OSError:  # a user namespace that does not map this uid
            continue
        if not readable:  # permitted still holds root's full set: keep one capability, or nothing at all
            class Header(ctypes.Structure):
                _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]

            class Data(ctypes.Structure):
                _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                            ("inheritable", ctypes.c_uint32)]

            keep = 1 << CAP_DAC_READ_SEARCH
            data = (Data * 2)(Data(keep, keep, 0), Data(0, 0, 0))
            if libc.capset(ctypes.byref(Header(CAPABILITY_VERSION_3, 0)), data) != 0:
                raise OSError(ctypes.get_errno(), "capset")
            libc.prctl(PR_SET_KEEPCAPS, zero, zero, zero, zero)
        return True, not readable
    return False, False


# Landlock (linux/landlock.h): syscall numbers are the same on every architecture.
SYS_LANDLOCK_CREATE_RULESET, SYS_LANDLOCK_ADD_RULE, SYS_LANDLOCK_RESTRICT_SELF = 444, 445, 446
LANDLOCK_CREATE_RULESET_VERSION, LANDLOCK_RULE_PATH_BENEATH = 1, 1
FS_EXECUTE, FS_WRITE_FILE, FS_READ_FILE, FS_READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
FS_MAKE_CHAR, FS_MAKE_BLOCK, FS_REFER, FS_TRUNCATE = 1 << 6, 1 << 11, 1 << 13, 1 << 14
FS_ABI1 = (1 << 13) - 1  # EXECUTE ... MAKE_SYM: every right of ABI 1, writes and creations included
FS_FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE  # the ones a rule on a file may hold
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
SCOPE_ABSTRACT_UNIX_SOCKET, SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6
# Read-only outside the folder: the Python installation (added at run time), system libraries (what
# extension modules link to), /proc (other processes' environ and memory stay out: Landlock refuses
# ptrace-mode access to processes outside the sandbox), and the few /etc files the stdlib reads.
READ_TREES = ("/usr", "/lib", "/lib64", "/lib32", "/nix/store", "/gnu/store", "/proc")
READ_FILES = ("/etc/ld.so.cache", "/etc/localtime", "/etc/mime.types", "/etc/nsswitch.conf", "/etc/passwd",
              "/etc/group", "/etc/os-release", "/dev/zero", "/dev/random", "/dev/urandom")


def landlock(ctypes, libc, work):
    """Kernel file confinement, for this process and all it starts: create, write, delete, rename only
    in the folder (and write /dev/null); read only the trees above; execute nothing. On Landlock ABI >= 4
    also no TCP bind or connect, on >= 6 no signals or abstract unix sockets outside the sandbox.
    True when the kernel took it; False where the kernel has no Landlock."""
    import stat, struct
    libc.syscall.restype = ctypes.c_long
    abi = libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), None, ctypes.c_size_t(0),
                       ctypes.c_uint32(LANDLOCK_CREATE_RULESET_VERSION))
    if abi < 1:  # ENOSYS (not built in) or EOPNOTSUPP (not in the boot-time LSM list)
        return False
    fs = FS_ABI1 | (FS_REFER if abi >= 2 else 0) | (FS_TRUNCATE if abi >= 3 else 0)
    net = NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0
    scoped = SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0
    attr = ctypes.create_string_buffer(struct.pack("QQQ", fs, net, scoped), 24)
    size = 24 if abi >= 6 else 16 if abi >= 4 else 8  # struct landlock_ruleset_attr grew with the ABI
    ruleset = libc.syscall(ctypes.c_long(SYS_LANDLOCK_CREATE_RULESET), attr, ctypes.c_size_t(size), ctypes.c_uint32(0))
    if ruleset < 0:
        raise OSError(ctypes.get_errno(), "landlock_create_ruleset")
    read = FS_READ_FILE | FS_READ_DIR
    rules = [(work, fs & ~(FS_EXECUTE | FS_MAKE_CHAR | FS_MAKE_BLOCK)),
             ("/dev/null", FS_READ_FILE | FS_WRITE_FILE | FS_TRUNCATE)]
    rules += [(p, read) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
                                  os.path.dirname(os.__file__)) + READ_TREES + READ_FILES]
    try:
        for path, access in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:  # not on this machine
                continue
            try:
                if not stat.S_ISDIR(os.fstat(fd).st_mode):
                    access &= FS_FILE_RIGHTS
                add_rule(ctypes, libc, ruleset, access & fs, fd)
            finally:
                os.close(fd)
        if stat.S_ISREG(os.fstat(0).st_mode):  # stdin: so open("/dev/stdin") works too
            add_rule(ctypes, libc, ruleset, FS_READ_FILE, 0)
        return libc.syscall(ctypes.c_long(SYS_LANDLOCK_RESTRICT_SELF), ctypes.c_long(ruleset), ctypes.c_uint32(0)) == 0
    finally:
        os.close(ruleset)


def add_rule(ctypes, libc, ruleset, access, fd):
    import struct
    beneath = ctypes.create_string_buffer(struct.pack("=Qi", access, fd), 12)  # packed landlock_path_beneath_attr
    if libc.syscall(ctypes.c_long(SYS_LANDLOCK_ADD_RULE), ctypes.c_long(ruleset),
                    ctypes.c_int(LANDLOCK_RULE_PATH_BENEATH), beneath, ctypes.c_uint32(0)) != 0:
        raise OSError(ctypes.get_errno(), f"landlock_add_rule on fd {fd}")


def seccomp(ctypes, libc, zero):
    """Install the syscall filter (x86_64 numbers). True when the kernel took it."""
    if os.uname().machine != "x86_64":
        return False
    import struct
    ld = lambda offset: struct.pack("HBBI", 0x20, 0, 0, offset)  # BPF_LD | BPF_W | BPF_ABS
    jeq = lambda k, jt, jf: struct.pack("HBBI", 0x15, jt, jf, k)
    jge = lambda k, jt, jf: struct.pack("HBBI", 0x35, jt, jf, k)
    jset = lambda k, jt, jf: struct.pack("HBBI", 0x45, jt, jf, k)
    ret = lambda k: struct.pack("HBBI", 0x06, 0, 0, k)
    nr, arch, arg = 0, 4, lambda i: 16 + 8 * i  # struct seccomp_data; low 32 bits of argument i
    allow, deny, nosys = ret(0x7FFF0000), ret(0x00050000 | EPERM), ret(0x00050000 | ENOSYS)
    prog = [ld(arch), jeq(0xC000003E, 1, 0), deny,  # AUDIT_ARCH_X86_64: no i386 syscall numbers
            ld(nr), jge(0x40000000, 0, 1), deny]  # nor x32 ones

    def rule(number, body):  # body runs when the syscall is `number`, and always returns
        prog.extend([ld(nr), jeq(number, 0, len(body))] + body)

    def only_values(i, values):  # allow when argument i is one of values
        return [ld(arg(i))] + [jeq(v, len(values) - j, 0) for j, v in enumerate(values)] + [deny, allow]

    for number in (57, 58, 59, 322,  # fork, vfork, execve, execveat
                   101, 310, 311,  # ptrace, process_vm_readv/writev
                   272, 308,  # unshare, setns
                   200, 424, 434, 438,  # tkill, pidfd_send_signal, pidfd_open, pidfd_getfd
                   425, 426, 427,  # io_uring_*: its operations would not pass through this filter
                   321, 323, 298,  # bpf, userfaultfd, perf_event_open
                   248, 249, 250):  # add_key, request_key, keyctl
        rule(number, [deny])
    rule(435, [nosys])  # clone3: its flags sit behind a pointer; ENOSYS makes glibc use clone
    rule(56, [ld(arg(0)), jset(CLONE_THREAD, 1, 0), deny, allow])  # clone: threads only
    rule(41, only_values(0, [AF_UNIX]))  # socket
    rule(16, [ld(arg(1)), jeq(0x5412, 0, 1), deny, allow])  # ioctl: not TIOCSTI (typing into a tty)
    me = os.getpid()
    rule(62, only_values(0, [me, 0, -me & 0xFFFFFFFF]))  # kill: ourselves and our own group
    rule(234, only_values(0, [me]))  # tgkill: our own threads
    prog.append(allow)

    class Fprog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]

    code = ctypes.create_string_buffer(b"".join(prog))
    fprog = Fprog(len(prog), ctypes.addressof(code))
    return libc.prctl(PR_SET_SECCOMP, ctypes.c_ulong(SECCOMP_MODE_FILTER), ctypes.byref(fprog), zero, zero) == 0


def install_guard(cfg, kernel_stops_processes, read_cap):
    """The audit hook. Any exception in a check counts as a refusal (fail closed)."""
    import types
    work, me, blocked_exit = os.path.realpath(cfg["work"]), os.getpid(), cfg["blocked_exit"]
    python_roots = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix)}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    devices = {"/dev/null", "/dev/zero", "/dev/random", "/dev/urandom", "/dev/stdin", "/dev/stdout", "/dev/stderr"}
    # Without the seccomp layer, _posixsubprocess.fork_exec (what subprocess and multiprocessing call)
    # starts processes with no audit event of its own; then `import subprocess` has to go too.
    forbidden_modules = frozenset({"ctypes", "_ctypes"} | (set() if kernel_stops_processes else {"_posixsubprocess"}))

    def resolve(path, dir_fd=None, follow=True):
        if isinstance(path, int):
            return os.path.realpath(f"/proc/self/fd/{path}")
        path = os.fsdecode(path)
        if dir_fd is not None and dir_fd >= 0 and not os.path.isabs(path):  # -1: no dir_fd
            path = os.path.join(f"/proc/self/fd/{dir_fd}", path)
        head, tail = os.path.split(os.path.abspath(path))
        if follow or tail in ("", ".", ".."):
            return os.path.realpath(path)
        return os.path.join(os.path.realpath(head), tail)  # remove/rename act on a link, not its target

    def inside(path, dir_fd=None, follow=True):
        real = resolve(path, dir_fd, follow)
        return real == work or real.startswith(work + "/")

    def may_read(real):
        """Outside the folder. A child that kept CAP_DAC_READ_SEARCH (for a stdlib under a 0700 home) could
        read anything: outside the Python installation, allow what any user could (world-readable, along
        world-searchable folders), so /etc/shadow or ~/.ssh stay out of reach of code that goes through here."""
        if not read_cap or not os.path.exists(real):  # a missing file: let open() say so
            return True
        if any(real == root or real.startswith(root + "/") for root in python_roots):
            return True
        if not os.stat(real).st_mode & 0o004:
            return False
        while real != "/":
            real = os.path.dirname(real)
            if not os.stat(real).st_mode & 0o001:
                return False
        return True

    def may_open(path, mode, flags, *_):
        if isinstance(path, int):  # wrapping a descriptor it already holds grants nothing new
            return True
        given = os.path.abspath(os.fsdecode(path))
        real = os.path.realpath(given)
        if given in devices or real in devices:
            return True
        if real == work or real.startswith(work + "/"):
            return True
        if given.startswith("/dev/") or real.startswith("/dev/"):  # ttys, disks
            return False
        return not (flags or 0) & write_flags and not os.path.isdir(real) and may_read(real)

    def may_list(path):
        return path is None or isinstance(path, int) or inside(path) or may_read(resolve(path))

    at = lambda a, i: a[i] if len(a) > i else None  # dir_fd arguments came in over Python versions
    # The tables are immutable and gc's object walks are blocked below, so a program cannot empty them;
    # the hook can still be fooled (it calls os.path functions a program may replace): the kernel
    # layers are what hold.
    checks = types.MappingProxyType({
        "open": lambda a: may_open(*a),
        "os.listdir": lambda a: may_list(a[0]),
        "os.scandir": lambda a: may_list(a[0]),
        "os.remove": lambda a: inside(a[0], at(a, 1), follow=False),
        "os.rmdir": lambda a: inside(a[0], at(a, 1), follow=False),
        "os.mkdir": lambda a: inside(a[0], at(a, 2), follow=False),
        "os.rename": lambda a: inside(a[0], at(a, 2), follow=False) and inside(a[1], at(a, 3), follow=False),
        "os.link": lambda a: inside(a[0], at(a, 2)) and inside(a[1], at(a, 3), follow=False),
        "os.symlink": lambda a: inside(a[1], at(a, 2), follow=False),
        "os.chmod": lambda a: inside(a[0], at(a, 2)),
        "os.chown": lambda a: inside(a[0], at(a, 3)),
        "os.utime": lambda a: inside(a[0], at(a, 3)),
        "os.truncate": lambda a: inside(a[0]),
        "os.setxattr": lambda a: inside(a[0]),
        "os.removexattr": lambda a: inside(a[0]),
        "shutil.rmtree": lambda a: inside(a[0], at(a, 1), follow=False),
        "os.kill": lambda a: a[0] in (0, me),
        "os.killpg": lambda a: a[0] == me,
        "socket.__new__": lambda a: a[1] == AF_UNIX,  # asyncio's self-pipe is an AF_UNIX socketpair
        "import": lambda a: a[0] not in forbidden_modules and not a[0].startswith("ctypes."),
        "sqlite3.connect": lambda a: inside(a[0]),  # ":memory:" and "" resolve inside too; URIs and ATTACH: kernel
    })
    always_blocked = frozenset({
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.startfile",
        "subprocess.Popen", "pty.spawn",
        # connect/bind are refused for AF_UNIX too: a filesystem socket (docker, dbus) is a way out
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
        "socket.gethostbyname", "socket.gethostbyaddr", "socket.getnameinfo", "socket.sethostname",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.dlsym/handle", "ctypes.call_function", "ctypes.cdata",
        "ctypes.cdata/buffer", "ctypes.addressof", "ctypes.string_at", "ctypes.wstring_at",
        "ctypes.PyObj_FromPtr", "fcntl.ioctl", "resource.setrlimit", "resource.prlimit", "webbrowser.open",
        "gc.get_objects", "gc.get_referrers", "gc.get_referents",  # ways to reach the hook's own objects
        "sqlite3.enable_load_extension", "sqlite3.load_extension",  # native code from a file
    })

    def block(event):
        for stream in (sys.stdout, sys.stderr):  # keep what the program printed before this
            try:
                stream.flush()
            except Exception:
                pass
        try:
            os.write(2, f"\nlmforge-sandbox: blocked {event}\n".encode())
        finally:
            os._exit(blocked_exit)

    def hook(event, args):
        if event in always_blocked:
            block(event)
        check = checks.get(event)
        if check is not None:
            try:
                allowed = check(args)
            except Exception:
                allowed = False
            if not allowed:
                block(event)

    sys.addaudithook(hook)


def run(code):
    """Run the program as __main__ (so doctest.testmod() and pickle find it); trim our frames off tracebacks."""
    import builtins, linecache, traceback, types, _sitebuiltins
    builtins.exit = _sitebuiltins.Quitter("exit", "Ctrl-D (i.e. EOF)")  # -S leaves them out
    builtins.quit = _sitebuiltins.Quitter("quit", "Ctrl-D (i.e. EOF)")
    main = types.ModuleType("__main__")
    sys.modules["__main__"], sys.argv = main, [""]
    linecache.cache["<generated>"] = (len(code), None, code.splitlines(True), "<generated>")
    try:
        exec(compile(code, "<generated>", "exec"), main.__dict__)
    except SystemExit:
        raise
    except BaseException as e:
        tb = e.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != "<generated>":
            tb = tb.tb_next
        traceback.print_exception(type(e), e, tb)
        sys.exit(1)


def main():
    cfg = json.loads(sys.argv[1])
    with open(cfg["program"], encoding="utf-8", errors="surrogatepass") as f:
        code = f.read()
    try:
        layers, read_cap = setup(cfg)
    except BaseException as e:
        os.write(2, f"lmforge-sandbox: setup failed: {e!r}\n".encode())
        os._exit(cfg["setup_failed_exit"])
    for name in [m for m in sys.modules if m in ("ctypes", "_ctypes") or m.startswith("ctypes.")]:
        del sys.modules[name]  # so that `import ctypes` is a fresh import, which the hook sees
    missing = [layer for layer in cfg["required"] if layer not in layers]
    if missing:  # the probe had them: a kernel limit hit in this run (user namespaces used up, say)
        os.write(2, f"lmforge-sandbox: setup failed: the {', '.join(missing)} layer did not take\n".encode())
        os._exit(cfg["setup_failed_exit"])
    install_guard(cfg, "seccomp" in layers, read_cap)
    layers.append("audit")
    if cfg["probe"]:
        print(json.dumps(layers))
    else:
        run(code)


main()
'''


def _child_env(work: Path) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": str(work),
        "TMPDIR": str(work),  # tempfile then works, inside the folder
        "LANG": "C.UTF-8",
        # glibc reserves 64 MB of address space per thread arena: under RLIMIT_AS a few threads would
        # exhaust a 256 MB limit without touching any memory
        "MALLOC_ARENA_MAX": "2",
    }


# ----------------------------------------------------------------------------- the parent

def run_python(code: str, *, stdin: str = "", limits: Limits = Limits()) -> SandboxResult:
    """Run `code` as a Python program in the sandbox, with `stdin` as its standard input."""
    if not isinstance(code, str) or not isinstance(stdin, str):
        raise LmforgeError(f"run_python takes the program and its stdin as str, got {type(code).__name__} "
                           f"and {type(stdin).__name__}")
    return _run(code, stdin, limits, probe=False, required=_required_layers(limits))


def run_many(codes: list[str], *, limits: Limits = Limits(), workers: int | None = None) -> list[SandboxResult]:
    """`run_python` on each program, `workers` at a time (default: one per CPU); results in input order.

    Threads suffice: each one only waits on its child process.
    """
    if workers is not None and workers < 1:
        raise LmforgeError(f"run_many(workers={workers}): use at least 1 worker, or None for one per CPU")
    codes = list(codes)
    if not codes:
        return []
    _required_layers(limits)  # refuse before any thread starts
    workers = min(workers or os.cpu_count() or 1, len(codes))
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sandbox") as pool:
        return list(pool.map(lambda code: run_python(code, limits=limits), codes))


@functools.cache
def active_layers() -> tuple[str, ...]:
    """The layers a sandboxed child gets on this machine, e.g. ('session', 'tempdir', 'netns', 'uid',
    'seccomp', 'rlimits', 'audit'). Measured once, by a child that reports instead of running code."""
    result = _run("", "", Limits(), probe=True)
    if not result.ok:
        raise RuntimeError(f"the sandbox's child did not start ({result.reason}): {result.stderr.strip()}")
    return tuple(json.loads(result.stdout))


def _required_layers(limits: Limits) -> tuple[str, ...]:
    """The kernel layers each child must get, which it checks for itself before it runs anything: all of
    KERNEL_LAYERS, or none when the user opted in to a weaker sandbox. Refuses when this machine lacks one."""
    if limits.allow_weak or os.environ.get(ALLOW_WEAK_ENV) == "1":
        return ()
    missing = [layer for layer in KERNEL_LAYERS if layer not in active_layers()]
    if missing:
        needs = "; ".join(f"{layer} needs {_LAYER_NEEDS.get(layer, 'a kernel feature')}" for layer in missing)
        what = f"{', '.join(missing)} layer{'s are' if len(missing) > 1 else ' is'}"
        raise LmforgeError(f"the sandbox's {what} missing on this machine ({needs}), so "
                           "generated code would run less confined; run where it is available, or accept the "
                           f"weaker sandbox with Limits(allow_weak=True) or {ALLOW_WEAK_ENV}=1")
    return KERNEL_LAYERS


def _run(code: str, stdin: str, limits: Limits, probe: bool, required: tuple[str, ...] = ()) -> SandboxResult:
    if not sys.platform.startswith("linux"):
        raise LmforgeError(f"the sandbox needs Linux (rlimits, namespaces, /proc); this is {sys.platform}")
    root = Path(tempfile.mkdtemp(prefix="lmforge-sandbox-"))
    try:
        os.chmod(root, 0o711)  # a dropped uid may pass through to work/, but not list or read the rest
        work = root / "work"
        work.mkdir(mode=0o700)
        program = root / "program.py"
        # 0600: the child reads its program while still the starting user, and gets stdin as a descriptor;
        # other sandboxes (which may list /tmp) cannot read either
        _write_private(program, code.encode("utf-8", "surrogatepass"))
        _write_private(root / "stdin", stdin.encode("utf-8", "surrogatepass"))
        config = {"work": str(work), "program": str(program), "probe": probe, "required": list(required),
                  "cpu_s": limits.cpu_s, "memory_mb": limits.memory_mb, "file_size_mb": limits.file_size_mb,
                  "blocked_exit": BLOCKED_EXIT_CODE, "setup_failed_exit": SETUP_FAILED_EXIT_CODE}
        argv = [sys.executable, "-I", "-S", "-B", "-X", "utf8", "-c", _BOOTSTRAP, json.dumps(config)]
        start = time.monotonic()
        with open(root / "stdin", "rb") as stdin_file:
            proc = subprocess.Popen(argv, stdin=stdin_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    cwd=work, env=_child_env(work), start_new_session=True)
        out, err, timed_out, status, usage = _wait(proc, limits, start + limits.timeout_s)
        seconds = time.monotonic() - start
    finally:
        _remove_tree(root)
    stdout = out.decode("utf-8", errors="replace")
    stderr = err.decode("utf-8", errors="replace")
    returncode, reason, timed_out = _classify(status, usage, stderr, timed_out, limits)
    return SandboxResult(returncode, stdout, stderr, timed_out, reason, seconds)


def _wait(proc: subprocess.Popen, limits: Limits, deadline: float):
    """Drain stdout/stderr (keeping max_output_bytes of each) until the child exits or the deadline passes;
    then kill its process group and reap it. Returns (stdout, stderr, timed_out, wait status, rusage)."""
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    buffers = {out_fd: bytearray(), err_fd: bytearray()}
    timed_out = False
    sel = selectors.DefaultSelector()
    for fd in buffers:
        sel.register(fd, selectors.EVENT_READ)
    try:  # a pidfd turns "the child exited" into one more readable descriptor (Linux >= 5.3)
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ)
        while not _exited(proc.pid):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(remaining if pidfd is not None else min(remaining, 0.01)):
                if key.fd in buffers:
                    _read(key.fd, buffers[key.fd], sel, limits.max_output_bytes)
    finally:
        # The child is alive or a zombie, not yet reaped: its pid, and so its group id, cannot have been
        # reused, so this kill reaches only what it started (if anything), never a stranger's process.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if pidfd is not None:
            sel.unregister(pidfd)
            os.close(pidfd)
        grace = time.monotonic() + 1.0  # read what was written before the kill, up to EOF
        while sel.get_map() and time.monotonic() < grace:
            for key, _ in sel.select(max(0.0, grace - time.monotonic())):
                _read(key.fd, buffers[key.fd], sel, limits.max_output_bytes)
        sel.close()
        proc.stdout.close()
        proc.stderr.close()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)  # so Popen never waits for it again
    return bytes(buffers[out_fd]), bytes(buffers[err_fd]), timed_out, status, usage


def _exited(pid: int) -> bool:
    """Has the child exited? Leaves it unreaped (WNOWAIT), see the kill in `_wait`."""
    return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None


def _read(fd: int, buffer: bytearray, sel: selectors.BaseSelector, cap: int) -> None:
    chunk = os.read(fd, 1 << 16)
    if not chunk:
        sel.unregister(fd)
    elif len(buffer) < cap:
        buffer += chunk[: cap - len(buffer)]


def _classify(status: int, usage, stderr: str, timed_out: bool, limits: Limits) -> tuple[int | None, str, bool]:
    """(returncode, reason, timed_out) from how the child ended."""
    code = os.waitstatus_to_exitcode(status)
    if timed_out:
        return None, "timeout", True
    last_line = (stderr.strip().splitlines() or [""])[-1]
    if code >= 0:
        if code == 0:
            return 0, "ok", False
        if code == BLOCKED_EXIT_CODE:
            return code, "blocked", False
        return code, "memory" if last_line.startswith("MemoryError") else "error", False
    sig = -code
    cpu_seconds = usage.ru_utime + usage.ru_stime
    # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL at the hard one (a program that ignores SIGXCPU)
    if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_seconds >= limits.cpu_s):
        return None, "timeout", True
    # A SIGKILL we did not send is the kernel's OOM killer; a crash in C code (a failed allocation under
    # RLIMIT_AS that was not checked) reads as memory when the process had grown big. Both are guesses.
    peak_mb = usage.ru_maxrss / 1024  # KiB on Linux
    if sig == signal.SIGKILL or (sig in (signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT)
                                 and peak_mb >= 0.5 * limits.memory_mb):
        return None, "memory", False
    return None, "killed", False


def _write_private(path: Path, data: bytes) -> None:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(data)


def _remove_tree(root: Path) -> None:
    """Delete the folder. Root removes anything; another user first gives itself back any directory the
    program made unreadable (the program ran as that same user)."""
    if os.geteuid() != 0:
        for folder, dirnames, _ in os.walk(root):
            for name in dirnames:
                try:
                    os.chmod(os.path.join(folder, name), 0o700, follow_symlinks=False)
                except OSError:
                    pass
    shutil.rmtree(root, ignore_errors=True)
