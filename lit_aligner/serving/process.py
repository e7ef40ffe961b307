"""A server in a child process on a free localhost port, for tests, benchmarks and scripts:

    with ServerProcess(["--aligners-dir", "out"]) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="none")

`command` starts another OpenAI-compatible server that takes --host and --port and answers GET /health (the serving
benchmark's peer, `transformers serve`)."""

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Dict, Optional, Sequence


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m lit_aligner.serving ARGS --host H --port <free>` (or `command ARGS ...`) until the context exits;
    entering waits until /health answers (RuntimeError with the server's last output lines if it exits or `timeout`
    passes first)."""

    def __init__(self, args: Sequence[str] = (), env: Optional[Dict[str, str]] = None, timeout: float = 180,
                 host: str = "127.0.0.1", command: Optional[Sequence[str]] = None):
        self.args, self.timeout, self.host = list(args), timeout, host
        self.command = list(command) if command else [sys.executable, "-m", "lit_aligner.serving"]
        self.env = {**os.environ, **(env or {})}
        self.port = free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.base_url = self.url + "/v1"
        self.proc: Optional[subprocess.Popen] = None
        self.log = Path(tempfile.mkstemp(prefix="lit-aligner-serve-", suffix=".log")[1])

    def __enter__(self) -> "ServerProcess":
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([*self.command, *self.args, "--host", self.host, "--port", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, env=self.env)
        try:
            self._wait_until_healthy()
        except BaseException:  # (Ctrl-C while it starts too) no `with` body ran, so no __exit__ would stop it
            self.__exit__(None, None, None)
            raise
        return self

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with status {self.proc.returncode}:\n{self.output(20)}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not answer within {self.timeout} s:\n{self.output(20)}")

    def output(self, lines: int = 50) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.unlink(missing_ok=True)
