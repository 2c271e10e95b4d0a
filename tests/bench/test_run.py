"""benchmarks/run.py: one runner, each benchmark dispatched with its options."""

from __future__ import annotations

import pytest


def test_run_only_batchsize_prints_the_batch_size_table(capsys, monkeypatch):
    import benchmarks.batchsize as batchsize
    from benchmarks.run import main

    calls = []

    def table(quick: bool, repeats: int) -> list[dict]:
        calls.append((quick, repeats))
        return [{"workload": "w", "batch_size": 64, "lr": 0.01, "steps": 5, "seconds": 0.5, "chosen": [64],
                 "ratio_to_best_fixed": 1.0}]

    monkeypatch.setattr(batchsize, "batch_size_table", table)
    assert main(["--only", "batchsize", "--quick"]) == 0
    out = capsys.readouterr().out
    assert calls == [(True, 1)]
    assert "| w | 64 | 0.01 | 5 | 0.50 | 1.00 |" in out


def test_run_only_groundtruth_passes_its_options_to_the_module(capsys, monkeypatch):
    import sys
    import types

    from benchmarks.run import main

    calls = []
    fake = types.ModuleType("benchmarks.groundtruth")
    fake.main = lambda argv: calls.append(argv) or 0  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "benchmarks.groundtruth", fake)
    assert main(["--only", "groundtruth", "--quick", "--tasks", "digits"]) == 0
    assert calls == [["--quick", "--tasks", "digits"]]


def test_run_names_a_benchmark_missing_from_the_checkout(capsys, monkeypatch):
    import importlib

    from benchmarks import run

    real = importlib.import_module

    def missing(name: str, *args, **kwargs):
        if name == "benchmarks.groundtruth":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(run.importlib, "import_module", missing)
    assert run.main(["--only", "groundtruth"]) == 2
    assert "benchmarks/groundtruth.py is not in this checkout" in capsys.readouterr().err


def test_run_refuses_options_of_a_benchmark_without_only(capsys):
    from benchmarks.run import main

    with pytest.raises(SystemExit):
        main(["--size-gb", "1"])
    assert "go after --only NAME" in capsys.readouterr().err
