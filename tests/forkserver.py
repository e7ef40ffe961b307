"""A fork server for the tests' command-line runs: `python SCRIPT ARGS` costs ~2 s of imports (torch, lightning,
tyro) before the script does anything, and the suite runs a hundred commands. This process imports those once, then
forks one child per command. The child is a real process running the real script as __main__ (runpy), with its own
working directory, environment, argv, stdout/stderr files, signal handlers and exit status, so what a test sees is
what a user's shell sees, minus the import time. Tests that depend on how the interpreter itself starts (signals sent
from outside, kill -9, environment read at import by a library such as huggingface_hub) use a plain subprocess.

Protocol: one JSON request per line on stdin ({"argv", "cwd", "env", "stdout", "stderr", "timeout"}), one JSON reply
per line on stdout ({"returncode"} or {"error"}); run by tests/helpers.py."""

import atexit
import importlib
import json
import os
import runpy
import signal
import sys
import time
import traceback

# Importing these starts no threads, so forking after them is safe; nothing here reads the environment a test
# changes per command (huggingface_hub does: it is left to each child).
PRELOAD = ["numpy", "torch", "safetensors.torch", "tokenizers", "jinja2", "tyro", "lightning_fabric", "tqdm",
           "lit_aligner.model", "lit_aligner.tokenizer", "lit_aligner.training", "lit_aligner.cli"]


def exit_code(e: SystemExit) -> int:
    """The status the interpreter gives `sys.exit(code)`: None is 0, an int itself, anything else printed and 1."""
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code
    print(e.code, file=sys.stderr)
    return 1


def child(req: dict) -> None:
    code = 1
    try:
        for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # as a fresh interpreter starts
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        stdin = os.open(os.devnull, os.O_RDONLY)
        os.dup2(stdin, 0)
        for fd, path in ((1, req["stdout"]), (2, req["stderr"])):
            f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(f, fd)
            os.close(f)
        script = os.path.abspath(req["argv"][0])
        extra = [p for p in req["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
        sys.path[:] = [os.path.dirname(script), *extra, *sys.path[1:]]
        sys.argv = list(req["argv"])
        if req["env"].get("OMP_NUM_THREADS", "").isdigit():
            import torch

            torch.set_num_threads(int(req["env"]["OMP_NUM_THREADS"]))
        if not os.path.isfile(req["argv"][0]):
            print(f"{sys.executable}: can't open file {script!r}: [Errno 2] No such file or directory", file=sys.stderr)
            code = 2
            return
        try:
            runpy.run_path(req["argv"][0], run_name="__main__")  # __file__ as given, like python
            code = 0
        except SystemExit as e:
            code = exit_code(e)
        except KeyboardInterrupt:
            traceback.print_exc()
            code = -signal.SIGINT  # python ends by its own SIGINT: the parent sees the signal, not a status
        except BaseException:
            traceback.print_exc()
            code = 1
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        if code == -signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        os._exit(code)


def wait(pid: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"returncode": os.waitstatus_to_exitcode(status)}
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return {"error": f"timed out after {timeout} s"}
        time.sleep(0.005)


def main() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:
            child(req)
        print(json.dumps(wait(pid, req["timeout"])), flush=True)


if __name__ == "__main__":
    main()
