"""Starts the real `python -m psa_jax.serve` process on a free loopback port (for the serving study and the tests).

    with running_server("--attention=psa", "--max_context=2048") as server:
      httpx.post(server.url + "/v1/completions", json=...)
      server.check_alive()  # raises ServerDied with the tail of the server's log if the process has exited

`server` also unpacks as a pair: `with running_server(...) as (url, proc):`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx


class ServerDied(RuntimeError):
  """The server process exited before it was asked to; the message ends with the tail of its log."""


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@dataclasses.dataclass
class Server:
  """A running server: its base URL (http://127.0.0.1:PORT), its process and the file its stdout and stderr go to."""
  url: str
  proc: subprocess.Popen
  log_path: pathlib.Path

  def __iter__(self):
    return iter((self.url, self.proc))

  def log_tail(self, lines: int = 40) -> str:
    try:
      text = self.log_path.read_text(errors="replace")
    except OSError as e:
      return f"(log {self.log_path} unreadable: {e})"
    return "\n".join(text.splitlines()[-lines:])

  def check_alive(self) -> None:
    if self.proc.poll() is not None:
      raise ServerDied(f"server exited with {self.proc.returncode}; last lines of {self.log_path}:\n"
                       f"{self.log_tail()}")


@contextlib.contextmanager
def running_server(*flags: str, timeout: float = 300.0, env: dict[str, str] | None = None,
                   log_path: str | os.PathLike | None = None):
  """Runs `python -m psa_jax.serve --port=<free port> *flags` until the block ends (then SIGTERM, SIGKILL after
  60 s), yielding a `Server` once /health answers, or raising ServerDied / TimeoutError with the log's tail.

  env: variables set on top of this process's environment. log_path: where the server's output goes; by default a
  temporary file removed afterwards. Output goes to a file, not a pipe: nobody reads a pipe while the server runs,
  and a server that logs enough under load would block once the pipe's buffer is full.
  """
  port = free_port()
  full_env = dict(os.environ, PSA_JAX_QUIET="1", **(env or {}))
  if log_path is None:
    fd, name = tempfile.mkstemp(prefix="psa_serve_", suffix=".log")
    os.close(fd)
    path, temporary = pathlib.Path(name), True
  else:
    path, temporary = pathlib.Path(log_path), False
    path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w") as log:
    proc = subprocess.Popen([sys.executable, "-m", "psa_jax.serve", f"--port={port}", *flags], env=full_env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
  server = Server(f"http://127.0.0.1:{port}", proc, path)
  deadline = time.monotonic() + timeout
  try:
    while True:
      server.check_alive()
      try:
        if httpx.get(server.url + "/health", timeout=2).status_code == 200:
          break
      except httpx.HTTPError:
        pass
      if time.monotonic() > deadline:
        raise TimeoutError(f"server did not come up in {timeout:.0f} s; last lines of its log:\n{server.log_tail()}")
      time.sleep(0.5)
    yield server
  finally:
    if proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
      try:
        proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    if temporary:
      path.unlink(missing_ok=True)
