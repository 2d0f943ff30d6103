"""Run untrusted programs (generated code and its tests) in a sandbox, one fresh process tree per run.

    result = run(Program(files={"main.py": source}, argv=["{python}", "-I", "main.py"]), Limits(wall_seconds=10))

Every run: a new staging folder holding the program's files, removed afterwards; a launcher process (this file,
run with `python -I -S`) in its own process group that sets up the isolation below and then execs the program with
an empty environment (C and JavaScript get PATH=/usr/bin:/bin only) under setrlimit limits on CPU seconds, address
space, processes, file size and open files. The parent kills the whole group (and, as root, every process of the
run's user) when the wall-clock limit passes.

As root (what CI and most containers are), the launcher also
- enters new mount, network and IPC namespaces: no network at all (not even loopback), and fresh tmpfs mounted
  over /tmp, /var/tmp and /dev/shm, where the program's files are copied, so nothing it writes outlives the run;
- drops to a user id of its own (not in /etc/passwd, never shared with another run): the process limit binds
  (it does not bind root), it cannot signal, read or write the evaluator's processes and files or anything not
  world-writable, and at the end every process of that uid is killed, even one that left the process group.
Not root: the same without a user of its own; network and mount namespaces only where unprivileged user
namespaces are allowed. `isolation()` says which protections are in force; `evaluate.py code` prints it.

It does NOT protect against: kernel exploits (it is not a VM or gVisor); reading world-readable files (the
program sees the host's filesystem read-only); using CPU and memory up to its limits; and, when not root, writing
the invoking user's files or the network where namespaces are not allowed.
"""
from __future__ import annotations

import ctypes
import json
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWIPC, CLONE_NEWNET = 0x00020000, 0x10000000, 0x08000000, 0x40000000
MS_REC, MS_PRIVATE = 0x4000, 0x40000
PRIVATE_TMP = ("/tmp", "/var/tmp", "/dev/shm")
WORK_DIR = "/tmp/work"          # inside the run's own /tmp when there is a mount namespace
FIRST_UID = 200_000             # run users are drawn from [FIRST_UID, FIRST_UID + UID_RANGE)
UID_RANGE = 1_000_000
SAFE_PATH = "/usr/bin:/bin"
OUTPUT_LIMIT = 64 * 1024        # bytes of stdout/stderr kept per run
SPEC_NAME = ".sandbox.json"


@dataclass
class Limits:
    cpu_seconds: int = 10
    wall_seconds: float = 15.0
    memory_bytes: int = 2 << 30       # address space; 0 = unlimited (node reserves far more than it uses)
    processes: int = 64
    file_bytes: int = 32 << 20
    open_files: int = 128


@dataclass
class Program:
    files: dict[str, str]          # relative path -> text, written into the run's own folder
    argv: list[str]                # "{python}" is replaced by a Python interpreter the run's user can execute
    stdin: str = ""
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    returncode: Optional[int]      # None when killed for the wall-clock limit
    stdout: str
    stderr: str
    timed_out: bool
    wall_seconds: float


# ----------------------------------------------------------------------------- the launcher (runs in the child)

def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _unshare(flags: int) -> bool:
    return _libc().unshare(flags) == 0


def _private_tmp() -> None:
    libc = _libc()
    if libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        raise OSError(ctypes.get_errno(), "cannot make mounts private")
    for path in PRIVATE_TMP:
        if os.path.isdir(path) and libc.mount(b"tmpfs", path.encode(), b"tmpfs", 0, b"mode=1777,size=64m") != 0:
            raise OSError(ctypes.get_errno(), f"cannot mount a tmpfs on {path}")


def _set_limits(limits: Limits) -> None:
    pairs = [(resource.RLIMIT_CPU, limits.cpu_seconds), (resource.RLIMIT_NPROC, limits.processes),
             (resource.RLIMIT_FSIZE, limits.file_bytes), (resource.RLIMIT_NOFILE, limits.open_files),
             (resource.RLIMIT_CORE, 0)]
    if limits.memory_bytes:
        pairs.append((resource.RLIMIT_AS, limits.memory_bytes))
    for kind, value in pairs:
        resource.setrlimit(kind, (value, value))


def launch(staging: str) -> None:
    """The child: isolate, copy the files into the work folder, drop to the run's user, exec the program."""
    spec = json.loads(Path(staging, SPEC_NAME).read_text())
    limits, uid = Limits(**spec["limits"]), spec["uid"]
    files = {name: Path(staging, name).read_bytes() for name in spec["files"]}
    work = staging
    if spec["namespaces"]:
        outer_uid, outer_gid = os.getuid(), os.getgid()
        if not _unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC | (0 if uid is not None else CLONE_NEWUSER)):
            os._exit(111)
        if uid is None:  # an unprivileged user namespace: be root inside it, mapped to this user outside
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"0 {outer_uid} 1")
            Path("/proc/self/gid_map").write_text(f"0 {outer_gid} 1")
        _private_tmp()
        work = WORK_DIR
        os.makedirs(work)
        for name, data in files.items():
            Path(work, name).parent.mkdir(parents=True, exist_ok=True)
            Path(work, name).write_bytes(data)
    if uid is not None:
        for root, dirs, names in os.walk(work):
            for name in [root, *(os.path.join(root, n) for n in dirs + names)]:
                os.chown(name, uid, uid)
    os.chdir(work)
    _set_limits(limits)
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    env = dict(spec["env"], HOME=work, TMPDIR=work) if spec["env"] else {}
    try:
        os.execve(spec["argv"][0], spec["argv"], env)
    except OSError as e:
        print(f"sandbox: cannot run {spec['argv'][0]}: {e.strerror}", file=sys.stderr)
        os._exit(127)


# ----------------------------------------------------------------------------- the parent

def _is_root() -> bool:
    return os.geteuid() == 0


def _kill_user(uid: int) -> None:
    """SIGKILL every process of uid: kill(-1) from a process running as uid reaches exactly those."""
    subprocess.run(["kill", "-KILL", "-1"], user=uid, group=uid, extra_groups=[], env={"PATH": SAFE_PATH},
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)


def user_processes(uid: int) -> list[int]:
    """Live processes whose real uid is uid (for tests and leftovers)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except OSError:
                continue
            uid_line = next((line for line in status.splitlines() if line.startswith("Uid:")), "")
            state = next((line for line in status.splitlines() if line.startswith("State:")), "")
            if uid_line.split()[1:2] == [str(uid)] and "zombie" not in state:
                found.append(int(entry.name))
    return found


def _drain(process: subprocess.Popen) -> tuple[bytes, bytes]:
    """What a killed run wrote; a process that escaped the kill and holds the pipes open is not waited for."""
    try:
        return process.communicate(timeout=2)
    except subprocess.TimeoutExpired:
        for pipe in (process.stdout, process.stderr):
            pipe.close()
        process.wait()
        return b"", b""


class Sandbox:
    """Which protections this machine allows (probed once), and run() for each program."""

    def __init__(self) -> None:
        self.root = _is_root()
        self.namespaces, self.namespace_note = self._probe_namespaces()
        self.python, self.python_note = self._find_python()

    def _probe(self, argv: list[str], namespaces: bool, uid: Optional[int]) -> bool:
        result = self._execute(Program({}, argv), Limits(wall_seconds=20), namespaces, uid)
        return result.returncode == 0

    def _probe_namespaces(self) -> tuple[bool, str]:
        if self._probe(["/bin/true"], True, self._new_uid() if self.root else None):
            how = "as root" if self.root else "through an unprivileged user namespace"
            return True, f"network: none (new network namespace, {how}); /tmp, /var/tmp, /dev/shm: private tmpfs"
        return False, ("network: NOT isolated (new namespaces are not allowed here: not root and no unprivileged "
                       "user namespaces); files: the program can write wherever this user can")

    def _find_python(self) -> tuple[str, str]:
        """An interpreter the run's user can execute: this one, or a system python3 when this one lives where an
        unprivileged user cannot read (pyenv under /root)."""
        candidates = [sys.executable, "/usr/bin/python3", "/usr/local/bin/python3"]
        if not self.root:
            return sys.executable, ""
        for candidate in dict.fromkeys(candidates):
            if os.path.exists(candidate) and self._probe([candidate, "-I", "-S", "-c", "import encodings"],
                                                         self.namespaces, self._new_uid()):
                note = "" if candidate == sys.executable else f"python: {candidate} (the run's user cannot read " \
                                                             f"{sys.executable})"
                return candidate, note
        return "", f"no Python interpreter that an unprivileged user can run (tried {', '.join(candidates)})"

    @staticmethod
    def _new_uid() -> int:
        return FIRST_UID + secrets.randbelow(UID_RANGE)

    def isolation(self) -> dict[str, str]:
        processes = ("processes: own user id per run (RLIMIT_NPROC binds), every process of it killed at the end"
                     if self.root else "processes: RLIMIT_NPROC counts all of this user's processes; the group "
                                       "is killed at the end")
        notes = {"isolation": self.namespace_note, "processes": processes}
        if self.python_note:
            notes["python"] = self.python_note
        return notes

    def run(self, program: Program, limits: Limits) -> Result:
        argv = [self.python if arg == "{python}" else arg for arg in program.argv]
        if not argv[0]:
            raise RuntimeError(self.python_note)
        if not self.root:
            # Without a user of its own the process limit counts this user's other processes too.
            limits = Limits(**{**asdict(limits), "processes": limits.processes + len(user_processes(os.getuid()))})
        return self._execute(Program(program.files, argv, program.stdin, program.env), limits, self.namespaces,
                             self._new_uid() if self.root else None)

    @staticmethod
    def _execute(program: Program, limits: Limits, namespaces: bool, uid: Optional[int]) -> Result:
        staging = tempfile.mkdtemp(prefix="arianna-sandbox-")
        started = time.monotonic()
        try:
            for name, text in program.files.items():
                if os.path.isabs(name) or ".." in Path(name).parts:
                    raise ValueError(f"file name {name!r} leaves the sandbox folder")
                path = Path(staging, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
            spec = {"limits": asdict(limits), "uid": uid, "files": list(program.files), "namespaces": namespaces,
                    "argv": program.argv, "env": program.env}
            Path(staging, SPEC_NAME).write_text(json.dumps(spec))
            process = subprocess.Popen([sys.executable, "-I", "-S", __file__, staging], stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={}, cwd=staging,
                                       process_group=0)
            timed_out = False
            try:
                stdout, stderr = process.communicate(program.stdin.encode("utf-8"), timeout=limits.wall_seconds)
            except subprocess.TimeoutExpired:
                timed_out = True
                stdout, stderr = b"", b""
            finally:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                if uid is not None:
                    _kill_user(uid)
                if timed_out:
                    stdout, stderr = _drain(process)
            return Result(None if timed_out else process.returncode, stdout[:OUTPUT_LIMIT].decode("utf-8", "replace"),
                          stderr[:OUTPUT_LIMIT].decode("utf-8", "replace"), timed_out, time.monotonic() - started)
        finally:
            shutil.rmtree(staging, ignore_errors=True)


if __name__ == "__main__":
    launch(sys.argv[1])
