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


class RedisServer:
    """A ``redis-server`` on 127.0.0.1 that a test may kill (SIGKILL) and start again on the same port and folder.

    ``appendonly=True`` keeps the data across a restart (fsync of every write); ``password`` requires one.
    """

    def __init__(self, folder: str | Path, *, appendonly: bool = False, password: str | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)")
        self.binary, self.folder = binary, Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.appendonly, self.password = appendonly, password
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL, with the password when there is one."""
        secret = f":{self.password}@" if self.password else ""
        return f"redis://{secret}127.0.0.1:{self.port}/0"

    def start(self) -> str:
        import redis

        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir",
                   str(self.folder), "--logfile", str(self.folder / "redis.log")]
        command += ["--appendonly", "yes", "--appendfsync", "always"] if self.appendonly else ["--appendonly", "no"]
        if self.password:
            command += ["--requirepass", self.password]
        self.process = subprocess.Popen(command)
        client = redis.Redis(port=self.port, password=self.password)
        try:
            for _ in range(250):
                try:
                    client.ping()
                    return self.url
                except redis.ConnectionError:
                    time.sleep(0.02)
            raise RuntimeError(f"redis-server did not start on port {self.port}: see {self.folder / 'redis.log'}")
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@contextlib.contextmanager
def temporary_redis_server(folder: str | Path | None = None) -> Iterator[str]:
    """A ``redis-server`` on 127.0.0.1 with a free port and a temporary folder, stopped on exit; yields its URL."""
    with contextlib.ExitStack() as stack:
        where = Path(folder) if folder is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        server = RedisServer(where)
        try:
            yield server.start()
        finally:
            server.stop()
