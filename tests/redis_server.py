"""A throw-away ``redis-server`` for the stream tests and the stream benchmark (not part of the library)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def temporary_redis_server(folder: str | Path | None = None) -> Iterator[str]:
    """A ``redis-server`` on 127.0.0.1 with a free port and a temporary folder, stopped on exit; yields its URL."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)")
    with contextlib.ExitStack() as stack:
        where = Path(folder) if folder is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        where.mkdir(parents=True, exist_ok=True)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                    "--appendonly", "no", "--dir", str(where), "--logfile", str(where / "redis.log")])
        client = redis.Redis(port=port)
        try:
            for _ in range(250):
                try:
                    client.ping()
                    break
                except redis.ConnectionError:
                    time.sleep(0.02)
            else:
                raise RuntimeError(f"redis-server did not start on port {port}: see {where / 'redis.log'}")
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            client.close()
            process.terminate()
            process.wait(timeout=10)
