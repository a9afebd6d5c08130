"""Local services on loopback: start one, wait until it answers, stop it with its children.

Used by the tests, the benchmarks and anyone trying qi on one machine: ``mlflow models serve``
for a registered model, an MLflow tracking server, a throwaway PostgreSQL cluster.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def interpreter_env(**extra: str) -> dict[str, str]:
    """This environment with the interpreter's own bin folder first on PATH (MLflow starts
    its servers by command name) and without a run inherited from ``mlflow run``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_RUN")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(extra)
    return env


def wait_until(
    ready: Callable[[], bool],
    what: str,
    process: subprocess.Popen | None = None,
    timeout: float = 90.0,
    interval: float = 0.2,
) -> None:
    """Poll ``ready`` until it is true; fail early when ``process`` exits, with its output."""
    deadline = time.monotonic() + timeout
    while not ready():
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}: {output_of(process)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} was not ready after {timeout:.0f} s")
        time.sleep(interval)


def answers(url: str) -> Callable[[], bool]:
    """Whether an HTTP GET of ``url`` gets any answer (a 401 or 404 is an answer too)."""

    def check() -> bool:
        try:
            urllib.request.urlopen(url, timeout=2)
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False
        return True

    return check


def start(command: list[str], env: dict[str, str] | None = None, **kwargs) -> subprocess.Popen:
    """A background process in its own process group; its output goes to a temporary file.

    Not to a pipe: nobody reads a server's pipe while it runs, and once a pipe's 64 KiB fill
    (a few thousand access-log lines) the server blocks on its next write and stops
    answering. :func:`output_of` reads the file.
    """
    log_file = tempfile.TemporaryFile(mode="w+", prefix="qi-service-")  # noqa: SIM115 (closed by stop)
    process = subprocess.Popen(
        command,
        env=env or interpreter_env(),
        stdout=log_file,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        **kwargs,
    )
    process.log_file = log_file  # type: ignore[attr-defined]
    return process


def output_of(process: subprocess.Popen, last: int = 3000) -> str:
    """The last ``last`` characters a process started by :func:`start` wrote."""
    log_file = getattr(process, "log_file", None)
    if log_file is None or log_file.closed:
        return ""
    log_file.flush()
    log_file.seek(0)
    return log_file.read()[-last:]


def stop(process: subprocess.Popen, timeout: float = 30.0) -> None:
    """SIGTERM to the process group (servers fork workers), SIGKILL if it lingers."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=timeout)
        except ProcessLookupError:
            pass
    log_file = getattr(process, "log_file", None)
    if log_file is not None:
        log_file.close()


@contextmanager
def model_server(model_uri: str, workers: int = 1, env: dict | None = None) -> Iterator[str]:
    """``mlflow models serve`` of ``model_uri`` on a free loopback port; yields its base URL."""
    port = free_port()
    process = start(
        [
            sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
            "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
            "--workers", str(workers),
        ],
        env=interpreter_env(**(env or {})),
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(answers(f"{url}/ping"), "mlflow models serve", process, timeout=120)
        yield url
    finally:
        stop(process)
