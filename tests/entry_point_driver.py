"""Run many entry-point command lines as ``python -m`` would, paying the torch import once (not a test module).

    python tests/entry_point_driver.py CASES_JSON TIMEOUT MODULE [MODULE ...]

A cold ``python -m model.X`` spends several CPU seconds importing torch before it reads an argument. This driver
imports the given MODULEs once, then forks one child per case. The child runs in its own process group with
stdout and stderr redirected to the case's files, runs its module as ``__main__``
(``runpy.run_module(..., run_name="__main__")``), and ends with what interpreter exit does before module teardown:
joining non-daemon threads, running atexit callbacks (DataLoader workers shut down there) and flushing. The
teardown itself is skipped; it costs 2 s of copy-on-write. The driver never runs a torch op before forking.

CASES_JSON: ``{name: [module, argv, stdout_path, stderr_path]}``. A case still running after TIMEOUT seconds is
killed with its process group. Prints one JSON line, ``{name: {"returncode": int | "timeout", "seconds": s}}``,
and nothing on stderr, so import-time noise of the MODULEs shows up in the caller's check of the driver's stderr.
"""
import atexit
import importlib
import json
import os
import runpy
import signal
import sys
import threading
import time


def run_case(module: str, argv: list, stdout_path: str, stderr_path: str) -> int:
    """In the forked child: the module as ``python -m module argv...``; returns its exit status."""
    os.setpgid(0, 0)
    for fd, path in ((1, stdout_path), (2, stderr_path)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.argv = [module, *argv]
    sys.modules.pop(module, None)  # run fresh as __main__, as ``python -m`` does
    code = 0
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:
        sys.excepthook(*sys.exc_info())  # the traceback an uncaught exception prints
        code = 1
    threading._shutdown()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def wait(pid: int, timeout: float):
    """Exit status of child ``pid``, or "timeout" after killing its process group."""
    start = time.monotonic()
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() - start > timeout:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return "timeout"
        time.sleep(0.01)


def main() -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout, as -m has cwd
    cases, timeout = json.loads(sys.argv[1]), float(sys.argv[2])
    for module in sys.argv[3:]:
        importlib.import_module(module)
    results = {}
    for name, (module, argv, stdout_path, stderr_path) in cases.items():
        sys.stdout.flush()
        sys.stderr.flush()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            os._exit(run_case(module, argv, stdout_path, stderr_path))
        results[name] = {"returncode": wait(pid, timeout), "seconds": round(time.monotonic() - start, 2)}
        try:  # DataLoader workers of the child, if any outlived it
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    print(json.dumps(results))


if __name__ == "__main__":
    main()
