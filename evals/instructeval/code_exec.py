"""Run untrusted HumanEval programs: one subprocess each, time-limited, offline, in a scratch folder.

Each program runs in a fresh ``python -I -S`` (no user site, no site-packages, no PYTHON* env vars)
whose working directory is a new temporary folder, with a minimal environment. Before the program
runs, a small prelude in the child

* sets resource limits: CPU seconds, address space, file size, no core dumps;
* disables networking by replacing the ``socket`` constructors and resolvers with ones that raise;
* disables spawning and signalling processes (``subprocess``, ``os.system``/``fork``/``kill``...).

The parent enforces a wall-clock limit and kills the child's whole process group when it runs over.
This is containment for honest-but-buggy model code (infinite loops, crashes, runaway memory), as the
HumanEval paper recommends; it is not a security boundary against malicious code. lm-eval only runs
the task when the user passes ``--confirm_run_unsafe_code``.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

DEFAULT_TIMEOUT_S = float(os.environ.get("LORASC_EVAL_EXEC_TIMEOUT", "10"))
DEFAULT_MEMORY_MB = int(os.environ.get("LORASC_EVAL_EXEC_MEMORY_MB", "2048"))

# Runs inside the child before the candidate program. Kept free of f-string braces: the limits
# arrive through argv, the program through a file.
_PRELUDE = r'''
import builtins, os, resource, socket, sys
cpu_s, mem_mb, program_file = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s + 1))
if mem_mb > 0:
    resource.setrlimit(resource.RLIMIT_AS, (mem_mb << 20, mem_mb << 20))
resource.setrlimit(resource.RLIMIT_FSIZE, (16 << 20, 16 << 20))
resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

def _blocked(*args, **kwargs):
    raise PermissionError("disabled in the HumanEval sandbox")

class _NoSocket(socket.socket):
    def __init__(self, *args, **kwargs):
        _blocked()

socket.socket = _NoSocket
for _name in ("create_connection", "create_server", "getaddrinfo", "gethostbyname", "gethostbyname_ex",
              "gethostbyaddr", "socketpair", "fromfd"):
    setattr(socket, _name, _blocked)
for _name in ("system", "popen", "fork", "forkpty", "kill", "killpg", "execv", "execve", "execvp",
              "execvpe", "spawnv", "spawnve", "posix_spawn", "posix_spawnp"):
    if hasattr(os, _name):
        setattr(os, _name, _blocked)
import subprocess
subprocess.Popen = _blocked
import shutil
shutil.rmtree = _blocked

with open(program_file, encoding="utf-8") as _f:
    _source = _f.read()
del _f
_globals = {"__name__": "__main__", "__builtins__": builtins}
exec(compile(_source, "candidate.py", "exec"), _globals)
'''


@dataclass
class ExecResult:
    """Outcome of one program: ``status`` is ``passed``, ``failed`` (non-zero exit), or ``timeout``."""

    passed: bool
    status: str
    detail: str = ""


def humaneval_program(problem: Dict[str, str], completion: str) -> str:
    """The program HumanEval runs: prompt + completion, then the tests, then ``check(entry_point)``."""
    return (problem["prompt"] + completion + "\n\n" + problem["test"] + "\n\n"
            + f"check({problem['entry_point']})\n")


def run_program(program: str, timeout: float = DEFAULT_TIMEOUT_S, memory_mb: int = DEFAULT_MEMORY_MB) -> ExecResult:
    """Run ``program`` in the sandbox; passed iff it exits 0 within ``timeout`` seconds."""
    with tempfile.TemporaryDirectory(prefix="lorasc_humaneval_") as scratch:
        program_file = Path(scratch) / "candidate.py"
        program_file.write_text(program, encoding="utf-8")
        stderr_file = Path(scratch) / "stderr.txt"
        env = {"PATH": "/usr/bin:/bin", "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8",
               "LORASC_SANDBOX": "1", "no_proxy": "*", "NO_PROXY": "*",
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
        cpu_s = max(1, math.ceil(timeout))
        cmd = [sys.executable, "-I", "-S", "-c", _PRELUDE, str(cpu_s), str(memory_mb), str(program_file)]
        with open(stderr_file, "wb") as err:
            # A new session makes the child a process-group leader, so a timeout kills everything
            # it started, not just the interpreter.
            proc = subprocess.Popen(cmd, cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                return ExecResult(False, "timeout", f"no exit within {timeout:g}s")
        if code == 0:
            return ExecResult(True, "passed")
        tail = stderr_file.read_bytes()[-2000:].decode("utf-8", "replace").strip().splitlines()
        reason = tail[-1] if tail else f"exit code {code}"
        if code < 0:  # killed by a signal, e.g. SIGXCPU from the CPU limit
            reason = f"signal {-code}" + (f": {reason}" if tail else "")
        return ExecResult(False, "failed", reason)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def run_programs(programs: Sequence[str], timeout: float = DEFAULT_TIMEOUT_S,
                 memory_mb: int = DEFAULT_MEMORY_MB, workers: Optional[int] = None) -> List[ExecResult]:
    """:func:`run_program` over many programs in parallel (threads only wait on subprocesses)."""
    if not programs:
        return []
    workers = workers or min(32, 2 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda p: run_program(p, timeout, memory_mb), programs))


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))
