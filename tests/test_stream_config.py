"""`batchfit train` from a Redis stream: examples/stream_recs.toml end to end, and its [stream] checks."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from batchfit.config import check_config, load_config
from batchfit.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "stream_recs.toml"


def test_stream_config_example_trains_from_redis_and_publishes_snapshots(redis_server, tmp_path):
    pytest.importorskip("pandas")
    pytest.importorskip("recbole")
    import redis

    import batchfit as bf
    from batchfit.run import run_config
    from batchfit.workloads.stream import load_movielens_100k, replay

    client = redis.Redis.from_url(redis_server)
    replay(client, "ratings", load_movielens_100k(), limit=1500, chunk=500)
    config = load_config(EXAMPLE)
    config["stream"].update(redis=redis_server, idle_timeout=0.5)
    config["train"].update(checkpoint_dir=str(tmp_path / "checkpoints"), out=str(tmp_path / "runs"), progress=False)
    config["callbacks"]["snapshots"] = {"folder": str(tmp_path / "snapshots"), "every_steps": 10}
    summary = run_config(config)
    # batches of 1024 (fewer when max_latency closes one first; the stream is replayed already, so rarely)
    assert summary is not None and summary["samples"] == 1500 and 2 <= summary["steps"] <= 8
    assert 0.5 < math.sqrt(summary["preq_loss"]) < 1.5  # ratings 1-5: a prequential RMSE, not a placeholder
    _, info = bf.load_snapshot(tmp_path / "snapshots")
    assert info["samples"] == 1500
    assert int(client.xpending("ratings", "batchfit")["pending"]) == 0  # all acknowledged after the last checkpoint
    assert (Path(summary["run_dir"]) / "metrics.csv").read_text().splitlines()[0].count("preq_loss") >= 1
    client.close()


def test_stream_config_needs_no_data_and_checks_its_keys(tmp_path):
    path = tmp_path / "run.toml"
    base = {"stream": {"stream": "ratings", "fields": ["user", "item", "rating"]},
            "model": {"name": "batchfit.workloads.stream:MatrixFactorization", "args": {"users": 3, "items": 4}}}
    assert check_config(base, path)["stream"]["group"] == "batchfit"
    with pytest.raises(ConfigError, match=r"`stream.max_latency` must be"):
        check_config({**base, "stream": {"stream": "ratings", "max_latency": "soon"}}, path)
    with pytest.raises(ConfigError, match=r"`data.train` is required .* or `stream.stream`"):
        check_config({"model": base["model"]}, path)


def test_stream_config_refuses_builtin_models_and_bad_fields(tmp_path):
    from batchfit.config import build_model, build_stream

    path = tmp_path / "run.toml"
    config = check_config({"stream": {"stream": "ratings", "redis": "redis://127.0.0.1:1/0"},
                           "model": {"name": "mlp"}}, path)
    pytest.importorskip("redis")
    with pytest.raises(ConfigError, match="the built-in models are sized from arrays"):
        build_model(config, build_stream(config))
    config["stream"]["fields"] = [1, 2]
    with pytest.raises(ConfigError, match=r"`stream.fields` must be a list of field names"):
        build_stream(config)


def test_stream_example_script_trains_and_reports_the_prequential_rmse(tmp_path):
    import shutil
    import subprocess
    import sys

    pytest.importorskip("pandas")
    pytest.importorskip("recbole")
    pytest.importorskip("redis")
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    script = EXAMPLE.with_suffix(".py")
    done = subprocess.run([sys.executable, str(script), "--limit", "800", "--rate", "50000", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "800 events, prequential RMSE" in done.stdout and (tmp_path / "curves.png").is_file()
    assert (tmp_path / "snapshots" / "LATEST").is_file()


def test_stream_config_ranges_reach_the_source_and_bad_ones_are_named(tmp_path):
    from batchfit.config import build_stream

    pytest.importorskip("redis")
    base = {"stream": {"stream": "ratings", "redis": "redis://127.0.0.1:1/0", "fields": ["user", "item", "rating"],
                       "ranges": {"user": [0, 943]}, "dead_letters": "poison"},
            "model": {"name": "batchfit.workloads.stream:MatrixFactorization", "args": {"users": 3, "items": 4}}}
    source = build_stream(check_config(base, tmp_path / "run.toml"))
    assert source.check((5000, 1, 4.0)) == "field 'user': 5000 is outside its range [0, 943)"
    assert source.check((5, 1, 4.0)) is None and source.consumer.dead_letters == "poison"
    base["stream"]["ranges"] = {"user": [943, 0]}
    with pytest.raises(ConfigError, match=r"`stream.ranges` must map field names to \[low, high\]"):
        build_stream(check_config(base, tmp_path / "run.toml"))


def test_stream_config_max_batch_size_reaches_the_source_and_needs_a_max_latency(tmp_path):
    from batchfit.config import build_stream

    pytest.importorskip("redis")
    base = {"stream": {"stream": "ratings", "redis": "redis://127.0.0.1:1/0", "fields": ["user", "item", "rating"],
                       "max_latency": 0.05, "max_batch_size": 512},
            "model": {"name": "batchfit.workloads.stream:MatrixFactorization", "args": {"users": 3, "items": 4}}}
    source = build_stream(check_config(base, tmp_path / "run.toml"))
    assert source.max_batch_size == 512 and source.max_latency == 0.05
    del base["stream"]["max_latency"]
    with pytest.raises(ConfigError, match=r"`stream.max_batch_size` must be a positive integer or \"auto\", with a "):
        build_stream(check_config(base, tmp_path / "run.toml"))


def test_optimizer_named_by_a_function_builds_the_recipe_and_refuses_non_optimizers(tmp_path):
    import torch

    from batchfit.config import build_loss, build_optimizer
    from batchfit.workloads.stream import MatrixFactorization, Recipe, SequentialMSE

    config = load_config(EXAMPLE)
    model = MatrixFactorization(**config["model"]["args"])
    optimizer = build_optimizer(config, model)
    recipe = Recipe()  # the example's TOML is the recipe: its optimizer, and its loss built for the model
    expected = recipe.optimizer(recipe.model())
    assert [(g["lr"], len(g["params"])) for g in optimizer.param_groups] == \
        [(g["lr"], len(g["params"])) for g in expected.param_groups] == [(51.2, 2), (25.6, 2)]
    assert optimizer.param_groups[0]["params"][0] is model.user_vectors.weight
    assert config["train"]["batch_size"] == recipe.batch_size
    loss = build_loss(config, model)
    assert isinstance(loss, SequentialMSE) and loss.model is model
    assert (loss.vector_step, loss.bias_step, loss.batch_size) == (recipe.lr_vectors, recipe.lr_biases, 1024)

    (tmp_path / "opt.py").write_text("def not_one(model, lr):\n    return [lr]\n")
    path = tmp_path / "run.toml"
    bad = check_config({"stream": {"stream": "ratings"}, "model": config["model"],
                        "optimizer": {"name": "opt:not_one", "lr": 0.1}}, path)
    with pytest.raises(ConfigError, match="must return a torch.optim.Optimizer"):
        build_optimizer(bad, torch.nn.Linear(2, 1))
    unknown = check_config({"stream": {"stream": "ratings"}, "model": config["model"],
                            "optimizer": {"name": "adamax", "lr": 0.1}}, path)
    with pytest.raises(ConfigError, match="one of .* or 'package.module:function'"):
        build_optimizer(unknown, torch.nn.Linear(2, 1))


def test_a_loss_with_args_is_built_for_the_model_and_refused_where_it_cannot_be(tmp_path):
    import torch

    from batchfit.config import build_loss

    (tmp_path / "losses.py").write_text(
        "import torch\n"
        "class Scaled:\n"
        "    def __init__(self, model, factor):\n"
        "        self.model, self.factor = model, factor\n"
        "    def __call__(self, output, target):\n"
        "        return self.factor * torch.nn.functional.mse_loss(output, target)\n")
    path = tmp_path / "run.toml"
    model = torch.nn.Linear(2, 1)
    config = check_config({"data": {"train": "data.npz"}, "loss": {"name": "losses:Scaled", "args": {"factor": 3.0}}},
                          path)
    loss = build_loss(config, model)
    assert loss.model is model and loss.factor == 3.0
    with pytest.raises(ConfigError, match="batchfit tune"):
        build_loss(config)
    with pytest.raises(ConfigError, match="do not fit"):
        build_loss(check_config({"data": {"train": "data.npz"},
                                 "loss": {"name": "losses:Scaled", "args": {"scale": 3.0}}}, path), model)
    with pytest.raises(ConfigError, match="must then be 'package.module:Factory'"):
        build_loss(check_config({"data": {"train": "data.npz"}, "loss": {"name": "mse", "args": {}}}, path), model)
