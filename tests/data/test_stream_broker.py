"""Broker faults against real redis-servers: a server killed and restarted (the trainer reconnects and loses
nothing), one down for good, a stream or group deleted, credentials missing or wrong, bad URLs and starts —
each a StreamError naming the URL (password masked), stream and group; no file batchfit writes holds a password."""

from __future__ import annotations

import collections
import logging
import threading

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchfit as bf

FIELDS = ("x0", "x1", "y")
PASSWORD = "s3cret-pw"

pytest.importorskip("redis")


@pytest.fixture
def server(tmp_path):
    """A redis-server with append-only persistence (it keeps its data across a kill) and a password."""
    import shutil

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    from redis_server import RedisServer  # tests/redis_server.py

    process = RedisServer(tmp_path / "redis", appendonly=True, password=PASSWORD)
    process.start()
    yield process
    process.stop()


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(2, 1)

    def forward(self, x0, x1):
        return self.linear(torch.stack([x0, x1], 1)).squeeze(1)


def _produce(url: str, count: int, stream: str = "events") -> list[str]:
    import redis

    client = redis.Redis.from_url(url)
    rng = np.random.default_rng(0)
    pipe = client.pipeline(transaction=False)
    for _ in range(count):
        x = rng.standard_normal(2)
        pipe.xadd(stream, {"x0": repr(float(x[0])), "x1": repr(float(x[1])), "y": repr(float(x[0] - x[1]))})
    ids = [i.decode() for i in pipe.execute()]
    client.close()
    return ids


def _source(url: str, **options) -> bf.StreamSource:
    options.setdefault("idle_timeout", 0.5)
    return bf.StreamSource(bf.RedisStream(url, "events", group="g", consumer="c", fields=FIELDS, **options))


def _trainer(tmp_path, callbacks=()) -> bf.Trainer:
    net = _Net()
    return bf.Trainer(net, F.mse_loss, torch.optim.SGD(net.parameters(), lr=0.05), batch_size=4, progress=False,
                      checkpoint_dir=tmp_path / "ckpt", checkpoint_every=2, callbacks=list(callbacks))


class _Lineage(bf.Callback):
    def __init__(self, source: bf.StreamSource) -> None:
        self.source, self.steps = source, []

    def on_step_end(self, trainer, record):
        self.steps.append(list(self.source.last_batch.ids))


def test_redis_killed_and_restarted_mid_run_reconnects_and_loses_nothing(server, tmp_path, caplog):
    import redis

    ids = _produce(server.url, 40)
    source = _source(server.url, retry_for=20.0)
    source.read_ahead = 4  # read a batch at a time, so that reads meet the dead server too
    lineage = _Lineage(source)
    restarted = threading.Event()

    class KillRedis(bf.Callback):
        def on_step_end(self, trainer, record):
            if record["step"] == 3:
                server.kill()  # SIGKILL; back 0.5 s later on the same port, with its append-only file
                timer = threading.Timer(0.5, lambda: (server.start(), restarted.set()))
                timer.start()

    trainer = _trainer(tmp_path, [lineage, KillRedis()])
    with caplog.at_level(logging.WARNING, logger="batchfit"):
        trainer.fit(source)
    assert restarted.is_set()
    trained = collections.Counter(i for step in lineage.steps for i in step)
    assert set(trained) == set(ids) and max(trained.values()) == 1 and trainer.samples_seen == 40
    client = redis.Redis.from_url(server.url)
    assert int(client.xpending("events", "g")["pending"]) == 0
    client.close()
    assert "reconnecting for up to 20 s" in caplog.text and "reconnected after" in caplog.text
    assert PASSWORD not in caplog.text and f"redis://:***@127.0.0.1:{server.port}/0" in caplog.text


def test_redis_down_for_longer_than_retry_for_is_a_clear_error(server, tmp_path, caplog):
    _produce(server.url, 8)
    source = _source(server.url, retry_for=0.5)
    server.kill()
    with caplog.at_level(logging.WARNING, logger="batchfit"):
        with pytest.raises(bf.StreamError) as raised:
            _trainer(tmp_path).fit(source)
    message = str(raised.value)
    assert message.startswith(f"Redis at redis://:***@127.0.0.1:{server.port}/0, stream 'events', group 'g': "
                              f"cannot reach the server (ConnectionError")
    assert "retried for 0.5 s (retry_for=)" in message and PASSWORD not in message + caplog.text


@pytest.mark.parametrize("delete", ["stream", "group"])
def test_stream_or_group_deleted_mid_run_is_a_clear_error_and_resume_refuses(server, tmp_path, delete):
    import redis

    _produce(server.url, 40)
    client = redis.Redis.from_url(server.url)

    class Delete(bf.Callback):
        def on_step_end(self, trainer, record):
            if record["step"] == 3:  # after the checkpoint of step 2
                if delete == "stream":
                    client.delete("events")
                else:
                    client.xgroup_destroy("events", "g")

    source = _source(server.url)
    source.read_ahead = 4
    with pytest.raises(bf.StreamError, match=r"stream 'events', group 'g': the stream or its consumer group no "
                                             r"longer exists \(NOGROUP"):
        _trainer(tmp_path, [Delete()]).fit(source)
    assert [p.name for p in (tmp_path / "ckpt").glob("step-*.pt")] == ["step-000000002.pt"]
    # The checkpoint of step 2 was written reading group g: a new group would train the stream again.
    with pytest.raises(bf.StreamError, match=r"the checkpoint was written while reading this group, which no longer "
                                             r"exists .*\(XGROUP CREATE events g <last trained id> MKSTREAM\)"):
        _trainer(tmp_path).fit(_source(server.url), resume=True)
    client.close()


@pytest.mark.parametrize("password", [None, "wrong"])
def test_missing_or_wrong_password_is_a_clear_error_without_the_password(server, tmp_path, password):
    secret = "" if password is None else f":{password}@"
    url = f"redis://{secret}127.0.0.1:{server.port}/0"
    with pytest.raises(bf.StreamError) as raised:
        _trainer(tmp_path).fit(_source(url, retry_for=5.0))
    message = str(raised.value)
    masked = "redis://:***@" if password else "redis://"
    assert message.startswith(f"Redis at {masked}127.0.0.1:{server.port}/0, stream 'events', group 'g': ")
    assert "the server refused the credentials" in message and "redis://:PASSWORD@host:port/db" in message
    assert "wrong" not in message and PASSWORD not in message


def test_wrong_port_bad_url_and_bad_start(tmp_path):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # nothing listens there
    with pytest.raises(bf.StreamError, match=rf"Redis at redis://127.0.0.1:{port}/0, stream 'events', group 'g': "
                                             r"cannot reach the server"):
        _trainer(tmp_path).fit(_source(f"redis://127.0.0.1:{port}/0", retry_for=0.2))
    with pytest.raises(bf.BatchfitError, match=r"`client` must be a redis.Redis client or a URL such as "
                                               r"redis://host:6379/0 .*Received: client='http://:\*\*\*@host/0'"):
        bf.RedisStream(f"http://:{PASSWORD}@host/0", "events")
    with pytest.raises(bf.BatchfitError, match=r"`start` must be '0' \(the whole stream\), '\$' .*Received: "
                                               r"start='latest'"):
        bf.RedisStream("redis://127.0.0.1:1/0", "events", start="latest")


def test_the_run_folder_copy_of_the_toml_has_its_password_masked(server, tmp_path):
    from batchfit.config import load_config
    from batchfit.run import run_config

    _produce(server.url, 16, stream="ratings")
    path = tmp_path / "run.toml"
    path.write_text(f"""
[stream]
redis = "{server.url}"
stream = "ratings"
fields = ["x0", "x1", "y"]
idle_timeout = 0.3

[model]
name = "test_stream_broker:_Net"

[loss]
name = "mse"

[train]
batch_size = 4
checkpoint_dir = "{tmp_path}/ckpt"
out = "{tmp_path}/runs"
progress = false
""")
    summary = run_config(load_config(path))
    assert summary is not None and summary["samples"] == 16
    written = [p for p in (tmp_path / "runs").rglob("*") if p.is_file()]
    assert any(p.name == "run.toml" for p in written)
    for file in written:
        assert PASSWORD.encode() not in file.read_bytes(), file
    copy = next(p for p in written if p.name == "run.toml").read_text()
    assert f'redis = "redis://:***@127.0.0.1:{server.port}/0"' in copy


def test_mask_secrets_and_the_cli_log_filter():
    import logging

    from batchfit.cli import not_shown
    from batchfit.errors import mask_secrets

    assert mask_secrets('redis = "redis://:pw@h:1/0"') == 'redis = "redis://:***@h:1/0"'
    assert mask_secrets("rediss://alice:p@ss@h/0 unix:///s.sock?password=x&db=1") == \
        "rediss://alice:***@h/0 unix:///s.sock?password=***&db=1"
    assert mask_secrets("redis://h:6379/0 http://a/b") == "redis://h:6379/0 http://a/b"
    record = logging.LogRecord("batchfit", logging.WARNING, __file__, 1, "lost %s", ("redis://:pw@h:1/0",), None)
    assert not_shown(record) and record.getMessage() == "lost redis://:***@h:1/0"
