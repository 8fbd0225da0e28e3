"""Starts the real `python -m psa_jax.serve` process on a free loopback port for tests."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import httpx


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running_server(*flags: str, timeout: float = 300.0):
  port = free_port()
  env = dict(os.environ, PSA_JAX_QUIET="1")
  proc = subprocess.Popen([sys.executable, "-m", "psa_jax.serve", f"--port={port}", *flags], env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  url = f"http://127.0.0.1:{port}"
  deadline = time.monotonic() + timeout
  try:
    while True:
      if proc.poll() is not None:
        raise RuntimeError(f"server exited with {proc.returncode}:\n{proc.stdout.read()}")
      try:
        if httpx.get(url + "/health", timeout=2).status_code == 200:
          break
      except httpx.HTTPError:
        pass
      if time.monotonic() > deadline:
        raise TimeoutError("server did not come up")
      time.sleep(0.5)
    yield url, proc
  finally:
    if proc.poll() is None:
      proc.send_signal(signal.SIGTERM)
      try:
        proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        proc.kill()
