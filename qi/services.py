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
    yield from _serving(process, f"http://127.0.0.1:{port}", "/ping", "mlflow models serve")


def dockerfile_command(name: str) -> str:
    """The shell command of ``docker/<name>``'s exec-form ``CMD ["sh", "-c", "..."]``: the
    tests and benchmarks start exactly what the images run (settings come from the
    environment: MLFLOW_BACKEND_STORE_URI, HOST, PORT, ...)."""
    import json

    dockerfile = Path(__file__).resolve().parent.parent / "docker" / name
    line = [ln for ln in dockerfile.read_text().splitlines() if ln.startswith("CMD ")][-1]
    argv = json.loads(line[len("CMD ") :])
    if argv[:2] != ["sh", "-c"]:
        raise ValueError(f'{dockerfile}: expected CMD ["sh", "-c", ...]')
    return argv[2]


@contextmanager
def tracking_server(
    backend_store_uri: str, artifacts: Path, basic_auth: bool = False, **env: str
) -> Iterator[str]:
    """An MLflow tracking server on a free loopback port with proxied artifacts, started with
    the tracking image's command; yields its URL. ``basic_auth`` needs ``mlflow[auth]``,
    ``MLFLOW_FLASK_SERVER_SECRET_KEY`` and ``MLFLOW_AUTH_ADMIN_PASSWORD`` in ``env``."""
    port = free_port()
    settings = {
        "MLFLOW_BACKEND_STORE_URI": backend_store_uri,
        "MLFLOW_ARTIFACTS_DESTINATION": str(artifacts),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "WORKERS": "1",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_APP_NAME": "basic-auth" if basic_auth else "",
        **env,
    }
    command = dockerfile_command("tracking.Dockerfile")
    process = start(["sh", "-c", command], env=interpreter_env(**settings))
    yield from _serving(process, f"http://127.0.0.1:{port}", "/health", "mlflow server")


def _serving(process: subprocess.Popen, url: str, ready: str, what: str) -> Iterator[str]:
    """Yield ``url`` once ``url + ready`` answers; stop the process afterwards, always."""
    try:
        wait_until(answers(f"{url}{ready}"), what, process, timeout=120)
        yield url
    finally:
        stop(process)


def postgres_binaries() -> Path | None:
    """The newest installed PostgreSQL's bin folder (Debian keeps them off PATH)."""
    import glob
    import shutil

    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(p.split("/")[-2]))
    if found:
        return Path(found[-1])
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@contextmanager
def postgres_cluster() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port (trust auth, no fsync: for
    tests and benchmarks only); yields its server URL ``postgresql+psycopg2://...`` without a
    database. As root the server runs as the ``postgres`` user, as PostgreSQL requires."""
    import shutil

    binaries = postgres_binaries()
    if binaries is None:
        raise FileNotFoundError("no PostgreSQL binaries: install the postgresql package")
    folder = Path(tempfile.mkdtemp(prefix="qi-postgres-"))
    as_root = os.geteuid() == 0
    prefix = ["runuser", "-u", "postgres", "--"] if as_root else []
    if as_root:
        shutil.chown(folder, "postgres", "postgres")
    data, socket_dir, port = folder / "data", folder, free_port()

    def pg(*args: str) -> None:
        done = subprocess.run([*prefix, *args], capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed: {(done.stderr or done.stdout)[-2000:]}")

    try:
        pg(str(binaries / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust")
        options = f"-p {port} -k {socket_dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        pg(str(binaries / "pg_ctl"), "-D", str(data), "-w", "-l", str(folder / "log"),
           "-o", options, "start")  # fmt: skip
        try:
            yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}"
        finally:
            pg(str(binaries / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def create_database(server_url: str, name: str) -> str:
    """Create database ``name`` on a PostgreSQL server; returns its URL."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(f"{server_url}/postgres", isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return f"{server_url}/{name}"
