"""Sharded data parallelism (``strategy="fsdp"``, FSDP2) on 2 CPU processes (gloo): what one process does.

1. Batch means batch: an MLP trained with micro-batches and gradient clipping (both ranks, each
   Linear sharded on its own) ends on the weights of one process, and validation agrees; a
   tiny Llama (``transformers`` config, no download) with a token-weighted loss over uneven
   ranks ends on the weights of a hand-written loop over whole batches.
   LoRA on it (only the adapters trainable) ends where one process does.
2. The parameters really are sharded: each rank holds half of every sharded weight.
3. What FSDP does not support is refused with a batchfit error.
4. Sharded checkpoints (torch.distributed.checkpoint): each rank writes its shard; a run stopped
   at step 5 resumes on 2 ranks bit-identical to the uninterrupted run, and on one process to
   1e-5; a save that fails midway leaves no checkpoint that loads; ``Trainer.save`` writes one
   ordinary file; a folder of the other strategy is refused.
5. An exception on one rank stops the other at once; ``batchfit train --nproc 2`` end to end.

Ranks fork from a forkserver that has imported torch, transformers and batchfit (the worktree's,
through the inherited ``sys.path``); each returns what it measured through a file.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import batchfit
from batchfit import ArraySource, BatchfitError, Callback, CheckpointError, Trainer
from batchfit.sharding import blocks, full_model_state, local_bytes
from batchfit.train import sharded_checkpoint
from batchfit.train.checkpoint import list_steps

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

RANK_TIMEOUT = 90.0
WORLD = 2
LLAMA_BATCH, LLAMA_SAMPLES, LLAMA_LR = 32, 64, 0.5


# ---------------------------------------------------------------- models and data


def mlp(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                               torch.nn.Linear(16, 3))


def mlp_data(num: int = 203, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num, 5)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64) + (x[:, 2] > 0.5).astype(np.int64)
    return x, y


def mlp_run(resume: bool = False, **options: Any) -> tuple[Trainer, torch.nn.Module, Any]:
    """2 epochs of 203 samples in batches of 64, SGD with momentum; returns the trainer, model, history."""
    model = mlp()
    trainer = Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                      batch_size=64, device="cpu", progress=False, seed=3, **options)
    history = trainer.fit(mlp_data(), epochs=2, val=mlp_data(37, seed=1), resume=resume)
    return trainer, model, history


def tiny_llama(seed: int = 0) -> torch.nn.Module:
    config = transformers.LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config)


def token_data(num: int = LLAMA_SAMPLES, seed: int = 0) -> dict[str, np.ndarray]:
    """Sequences of 2-24 tokens with an ignored (-100) prompt of 0-5 labels, padded with token 3."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 25, num)
    ids = np.full((num, 24), 3, dtype=np.int64)
    labels = np.full((num, 24), 3, dtype=np.int64)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(4, 61, length)
        labels[row, :length] = ids[row, :length]
        labels[row, :rng.integers(0, 6)] = -100
    return {"input_ids": ids, "input_ids_lengths": lengths, "labels": labels, "labels_lengths": lengths}


def llama_reference() -> dict[str, torch.Tensor]:
    """One epoch of whole batches of 32 by hand: the loss is the mean over every target token of a batch."""
    data, model = token_data(), tiny_llama()
    optimizer = torch.optim.SGD(model.parameters(), lr=LLAMA_LR)
    for lo in range(0, LLAMA_SAMPLES, LLAMA_BATCH):
        ids = torch.from_numpy(data["input_ids"][lo:lo + LLAMA_BATCH])
        inside = torch.arange(ids.shape[1])[None, :] < torch.from_numpy(data["input_ids_lengths"][lo:lo + 32])[:, None]
        labels = torch.from_numpy(data["labels"][lo:lo + LLAMA_BATCH]).masked_fill(~inside, -100)
        model(input_ids=ids, attention_mask=inside.long(), labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return weights(model)


def lora_llama() -> torch.nn.Module:
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    return peft.get_peft_model(tiny_llama(), config)


def llama_run(lora: bool = False, **options: Any) -> tuple[Trainer, torch.nn.Module]:
    model = lora_llama() if lora else tiny_llama()
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainer = Trainer(model, None, torch.optim.SGD(trainable, lr=LLAMA_LR), batch_size=LLAMA_BATCH,
                      shuffle=False, device="cpu", progress=False, **options)
    trainer.fit(ArraySource(**token_data()), epochs=1)
    return trainer, model


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------- what each rank runs


def scenario_equivalence(rank: int) -> dict[str, Any]:
    out: dict[str, Any] = {"batchfit": batchfit.__file__}
    trainer, model, history = mlp_run(strategy="fsdp", shard=[torch.nn.Linear], **FSDP_MLP)
    out["mlp_local_shapes"] = {k: tuple(v.to_local().shape) for k, v in model.state_dict().items()}
    out["mlp"] = full_model_state(model)
    out["mlp_epochs"] = history.epochs
    out["mlp_evaluate"] = trainer.evaluate(mlp_data(37, seed=1))  # a collective: both ranks call it
    trainer, model = llama_run(strategy="fsdp", micro_batch_size=8)
    out["llama_blocks"] = type(model.model.layers[0]).__mro__[1].__name__  # FSDPModule
    out["llama"] = full_model_state(model)
    out["llama_bytes"] = local_bytes(model, trainer.optimizer)
    trainer, model = llama_run(lora=True, strategy="fsdp", micro_batch_size=8)
    out["lora"] = full_model_state(model)
    return out


class StopAt(Callback):
    """Asks to stop after step ``step`` (on rank 0: every rank stops at the same step)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        if record["step"] == self.step and trainer.dist.rank == 0:
            trainer.stop_training = True


class RaiseAt(Callback):
    """Raises after step ``step`` on rank 1 only."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer: Trainer, record: dict) -> None:
        if record["step"] == self.step and trainer.dist.rank == 1:
            raise ValueError("rank 1 cannot go on")


SMALL_BUDGET, LARGE_BUDGET = 2.0e6, 1.0e9  # bytes: the tiny Llama's step fits 8-ish of 32 samples / all of them


def scenario_auto_fit(rank: int) -> dict[str, Any]:
    """``micro_batch_size="auto"`` (and ``micro_batch_tokens``) under DDP and FSDP, one rank given less memory."""
    from batchfit.measure import memory

    out: dict[str, Any] = {}
    for strategy, budgets, option in [("fsdp", (LARGE_BUDGET, LARGE_BUDGET), "micro_batch_size"),
                                      ("fsdp", (SMALL_BUDGET, SMALL_BUDGET), "micro_batch_size"),
                                      ("fsdp", (LARGE_BUDGET, SMALL_BUDGET), "micro_batch_size"),
                                      ("fsdp", (SMALL_BUDGET, LARGE_BUDGET), "micro_batch_size"),
                                      ("fsdp", (LARGE_BUDGET, SMALL_BUDGET), "micro_batch_tokens"),
                                      ("ddp", (SMALL_BUDGET, SMALL_BUDGET), "micro_batch_size"),
                                      ("ddp", (LARGE_BUDGET, SMALL_BUDGET), "micro_batch_size")]:
        memory.host_budget = lambda budget=budgets[rank]: budget  # type: ignore[misc]
        trainer, model = llama_run(strategy=strategy, **{option: "auto"})
        plan = trainer.plan
        key = f"{strategy} {option} {budgets[0]:.0e}/{budgets[1]:.0e}"
        out[key] = {"micro": plan.micro_batch_size, "tokens": plan.micro_batch_tokens,
                    "batch": plan.batch_size, "steps": trainer.step,
                    "weights": full_model_state(model) if strategy == "fsdp" else weights(model)}
    return out


def scenario_failure(rank: int) -> dict[str, Any]:
    start = time.monotonic()
    try:
        mlp_run(strategy="fsdp", callbacks=[RaiseAt(3)], **FSDP_MLP)
    except BatchfitError as error:  # the other rank's failure, named
        return {"error": type(error).__name__, "message": str(error), "seconds": time.monotonic() - start}
    return {}


FSDP_MLP = {"micro_batch_size": 16, "max_grad_norm": 0.1}


def scenario_checkpoint(rank: int, folder: str, resume: bool = False, stop_at: int | None = None) -> dict[str, Any]:
    """The MLP of the equivalence run with a sharded checkpoint at every step; saved at the end."""
    callbacks = [StopAt(stop_at)] if stop_at else []
    trainer, model, _ = mlp_run(strategy="fsdp", shard=[torch.nn.Linear], checkpoint_dir=folder, checkpoint_every=1,
                                resume=resume, callbacks=callbacks, **FSDP_MLP)
    saved = trainer.save(os.path.join(folder, "model.pt") if rank == 0 else None)
    return {"steps": trainer.step, "weights": full_model_state(model), "saved": saved}


def scenario_killed_write(rank: int, folder: str, step: int, where: str) -> dict[str, Any]:
    """The checkpointed MLP run, held still in the middle of writing the checkpoint of ``step`` for the test to
    SIGKILL it: ``where="shards"``, rank 1 once its DCP shard file is written (before the ``.metadata`` that rank 0
    writes when every shard is in); ``where="trainer state"``, rank 0 once the DCP save is complete, before
    ``trainer.pt`` and the marker. The held rank writes ``held-<rank>`` next to the folder, then sleeps."""
    import torch.distributed.checkpoint.filesystem as dcp_files

    holding = os.path.join(folder, f".step-{step:09d}.sharded-tmp")

    def hold() -> None:
        marker = Path(folder).parent / f"held-{rank}"
        marker.with_suffix(".tmp").write_text(str(os.getpid()))
        os.replace(marker.with_suffix(".tmp"), marker)  # the test never reads it half-written
        time.sleep(RANK_TIMEOUT * 2)

    if where == "shards" and rank == 1:
        real_write = dcp_files._FileSystemWriter.write_data

        def write_then_hold(self: Any, *args: Any, **kwargs: Any) -> Any:
            written = real_write(self, *args, **kwargs)
            if str(self.path) == holding:
                written.wait()  # the shard file is on disk
                hold()
            return written

        dcp_files._FileSystemWriter.write_data = write_then_hold  # type: ignore[method-assign]
    elif where == "trainer state" and rank == 0:
        real_atomic = sharded_checkpoint.atomic_write

        def hold_then_write(path: Any, *args: Any, **kwargs: Any) -> Any:
            if str(path) == os.path.join(holding, sharded_checkpoint.TRAINER_FILE):
                hold()
            return real_atomic(path, *args, **kwargs)

        sharded_checkpoint.atomic_write = hold_then_write  # type: ignore[assignment]
    return scenario_checkpoint(rank, folder)


def run_rank(rank: int, port: int, scenario: str, kwargs: dict[str, Any], result: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    start = time.monotonic()
    try:
        outcome = {"result": globals()[f"scenario_{scenario}"](rank, **kwargs)}
    except BaseException as error:
        outcome = {"error": type(error).__name__, "message": str(error), "traceback": traceback.format_exc()}
    outcome["seconds"] = time.monotonic() - start
    torch.save(outcome, result + ".tmp")
    os.replace(result + ".tmp", result)
    os._exit(0)


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed.fsdp", "transformers", "batchfit",
                                    __name__])
    warm_up = context.Process(target=time.sleep, args=(0,))
    warm_up.start()
    warm_up.join(RANK_TIMEOUT * 2)
    return context


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(forkserver, results_in: Path, scenario: str, **kwargs: Any) -> list[dict[str, Any]]:
    """Run ``scenario`` on 2 ranks; each rank's outcome."""
    port, start = free_port(), time.monotonic()
    results = [str(results_in / f"{scenario}-{time.monotonic_ns()}-rank{rank}.pt") for rank in range(WORLD)]
    ranks = [forkserver.Process(target=run_rank, args=(rank, port, scenario, kwargs, results[rank]))
             for rank in range(WORLD)]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join(max(0.1, start + RANK_TIMEOUT - time.monotonic()))
    hung = [rank for rank, process in enumerate(ranks) if process.is_alive()]
    for process in ranks:
        if process.is_alive():
            process.kill()
            process.join()
    assert not hung, f"ranks {hung} of {scenario!r} still ran after {RANK_TIMEOUT} s"
    return [torch.load(path, weights_only=False) if os.path.exists(path) else {"exitcode": process.exitcode}
            for path, process in zip(results, ranks)]


def result_of(outcome: dict[str, Any]) -> Any:
    assert "result" in outcome, outcome.get("traceback", outcome)
    return outcome["result"]


def assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


# ---------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def equivalence(forkserver, tmp_path_factory):
    return [result_of(outcome) for outcome in launch(forkserver, tmp_path_factory.mktemp("fsdp"), "equivalence")]


def test_ranks_run_this_checkout(equivalence):
    assert equivalence[0]["batchfit"] == batchfit.__file__


def test_fsdp_mlp_with_micro_batches_and_clipping_equals_one_process(equivalence):
    _, expected, history = mlp_run(micro_batch_size=16, max_grad_norm=0.1)
    _, unclipped, _ = mlp_run(micro_batch_size=16)
    assert largest_difference(weights(unclipped), weights(expected)) > 1e-2  # clipping is at work
    assert equivalence[1]["mlp"] == {}  # the full weights are gathered on rank 0 only
    assert_same(equivalence[0]["mlp"], weights(expected))
    for rank_result in equivalence:
        for record, single in zip(rank_result["mlp_epochs"], history.epochs, strict=True):
            for key in ("loss", "val_loss", "val_accuracy"):
                assert record[key] == pytest.approx(single[key], rel=1e-5)
        assert rank_result["mlp_evaluate"]["loss"] == pytest.approx(history.epochs[-1]["val_loss"], rel=1e-5)


def test_fsdp_shards_every_weight_over_the_ranks(equivalence):
    shapes = equivalence[0]["mlp_local_shapes"]
    assert shapes["0.weight"] == (8, 5) and shapes["2.weight"] == (8, 16)  # rows of (16, 5) and (16, 16) split
    assert shapes["4.weight"] == (2, 16) and equivalence[1]["mlp_local_shapes"]["4.weight"] == (1, 16)  # 3 rows
    assert equivalence[0]["llama_blocks"] == "FSDPModule"


def test_fsdp_tiny_llama_token_weighted_equals_whole_batches(equivalence):
    reference = llama_reference()
    assert_same(equivalence[0]["llama"], reference)
    assert largest_difference(equivalence[0]["llama"], weights(tiny_llama())) > 1e-3  # it trained


def test_fsdp_lora_trains_only_the_adapters_as_one_process_does(equivalence):
    _, model = llama_run(lora=True, micro_batch_size=8)
    expected, base = weights(model), weights(lora_llama())
    assert_same(equivalence[0]["lora"], expected)
    adapters = [k for k in expected if "lora_" in k]
    assert adapters and all(torch.equal(equivalence[0]["lora"][k], base[k]) for k in expected if k not in adapters)
    assert largest_difference({k: equivalence[0]["lora"][k] for k in adapters}, base) > 1e-3  # the adapters moved


def test_fsdp_finds_the_blocks_of_a_hugging_face_model():
    model = tiny_llama()
    assert blocks(model) == list(model.model.layers)
    net = mlp()
    assert blocks(net, [torch.nn.Linear]) == [net[0], net[2], net[4]]
    assert blocks(net) == []  # no blocks found: the root alone is sharded
    assert [type(m).__name__ for m in blocks(mlp(), lambda m: isinstance(m, torch.nn.Tanh))] == ["Tanh", "Tanh"]


@pytest.mark.parametrize("options, words", [
    ({"strategy": "zero"}, "strategy"),
    ({"strategy": "fsdp", "batch_size": "adaptive"}, "batch_size='adaptive'"),
    ({"strategy": "fsdp", "noise_scale": True}, "noise scale"),
    ({"strategy": "fsdp", "precision": "fp16"}, "fp16"),
])
def test_fsdp_refuses_what_it_does_not_support(options, words):
    model = mlp()
    with pytest.raises(BatchfitError, match=words):
        Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), progress=False, **options)


def test_shard_policy_is_checked():
    model = mlp()
    with pytest.raises(BatchfitError, match="shard"):
        Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), shard=["Linear"])


# ---------------------------------------------------------------- sharded checkpoints


def test_fsdp_checkpoint_resumes_on_two_ranks_bit_identical_and_on_one_process(forkserver, tmp_path, equivalence):
    folder = tmp_path / "two"
    stopped = [result_of(o) for o in launch(forkserver, tmp_path, "checkpoint", folder=str(folder), stop_at=5)]
    assert [r["steps"] for r in stopped] == [5, 5]
    newest = folder / "step-000000005"
    assert sorted(p.name for p in newest.iterdir()) == [".metadata", "COMPLETE", "__0_0.distcp", "__1_0.distcp",
                                                        "trainer.pt"]  # each rank wrote its shard
    assert [p.name for p in sharded_checkpoint.list_sharded(folder)] == [f"step-00000000{s}" for s in (5, 4, 3)]
    assert not list(folder.glob(".step-*"))  # no temporary folder left
    shutil.copytree(folder, tmp_path / "one")

    resumed = [result_of(o) for o in launch(forkserver, tmp_path, "checkpoint", folder=str(folder), resume=True)]
    assert [r["steps"] for r in resumed] == [8, 8]
    uninterrupted = equivalence[0]["mlp"]  # the same run on 2 ranks, never stopped
    assert all(torch.equal(resumed[0]["weights"][k], uninterrupted[k]) for k in uninterrupted)  # bit-identical

    # 2 -> 1: the same checkpoint resumed by one process (no process group: DCP reshards into plain tensors).
    trainer, model, _ = mlp_run(strategy="fsdp", checkpoint_dir=tmp_path / "one", resume=True, **FSDP_MLP)
    _, single, _ = mlp_run(**FSDP_MLP)
    assert trainer.step == 8
    assert_same(weights(model), weights(single))
    assert_same(weights(model), uninterrupted)


@pytest.mark.parametrize("where, held", [("shards", 1), ("trainer state", 0)])
def test_fsdp_run_killed_in_the_middle_of_a_checkpoint_write_resumes_bit_identical(forkserver, tmp_path, equivalence,
                                                                                    where, held):
    """A real SIGKILL of the rank that is writing step 6's checkpoint: the half-written folder is never listed,
    the other rank stops with a DistributedError, and a resume from step 5 ends on the uninterrupted weights."""
    folder = tmp_path / "checkpoints"
    port, start = free_port(), time.monotonic()
    results = [tmp_path / f"rank{rank}.pt" for rank in range(WORLD)]
    ranks = [forkserver.Process(target=run_rank, args=(rank, port, "killed_write",
                                                       {"folder": str(folder), "step": 6, "where": where},
                                                       str(results[rank]))) for rank in range(WORLD)]
    for process in ranks:
        process.start()
    try:
        marker = tmp_path / f"held-{held}"
        while not marker.exists():
            assert time.monotonic() < start + RANK_TIMEOUT and not any(r.exists() for r in results), \
                [torch.load(r, weights_only=False) for r in results if r.exists()]
            time.sleep(0.01)
        assert int(marker.read_text()) == ranks[held].pid
        os.kill(ranks[held].pid, signal.SIGKILL)
        ranks[held].join(RANK_TIMEOUT)
        other = ranks[1 - held]
        other.join(RANK_TIMEOUT)
        assert not other.is_alive(), "the other rank still waits for the killed one"
    finally:
        for process in ranks:
            if process.is_alive():
                process.kill()
                process.join()
    assert ranks[held].exitcode == -signal.SIGKILL and not results[held].exists()
    outcome = torch.load(results[1 - held], weights_only=False)
    assert outcome.get("error") == "DistributedError", outcome  # it noticed, it did not finish

    half = folder / ".step-000000006.sharded-tmp"
    written = sorted(p.name for p in half.iterdir())
    if where == "shards":  # both shards are on disk; the DCP metadata and everything after are not
        assert "__1_0.distcp" in written and ".metadata" not in written, written
    else:  # the DCP save is complete; trainer.pt and the marker are not
        assert {".metadata", "__0_0.distcp", "__1_0.distcp"} <= set(written), written
    assert sharded_checkpoint.MARKER not in written and sharded_checkpoint.TRAINER_FILE not in written
    assert not (folder / "step-000000006").exists()
    listed = [p.name for p in sharded_checkpoint.list_sharded(folder)]
    assert listed == ["step-000000005", "step-000000004", "step-000000003"]
    assert [p.name for p in list_steps(folder, re.compile(r"^step-(\d+)$"), lambda p: (p / "COMPLETE").is_file())] \
        == listed

    resumed = [result_of(o) for o in launch(forkserver, tmp_path, "checkpoint", folder=str(folder), resume=True)]
    assert [r["steps"] for r in resumed] == [8, 8]
    uninterrupted = equivalence[0]["mlp"]
    assert all(torch.equal(resumed[0]["weights"][k], uninterrupted[k]) for k in uninterrupted)  # bit-identical
    assert not half.exists()  # the resumed run wrote step 6 again, replacing the leftover


def test_fsdp_save_writes_one_ordinary_file(forkserver, tmp_path):
    results = [result_of(o) for o in launch(forkserver, tmp_path, "checkpoint", folder=str(tmp_path))]
    assert results[1]["saved"] is None and results[0]["saved"] == tmp_path / "model.pt"
    record = torch.load(tmp_path / "model.pt", weights_only=True)  # no torch.distributed, no DTensor
    assert all(type(v) is torch.Tensor for v in record["model"].values())
    loaded = batchfit.load_model(tmp_path / "model.pt", mlp(seed=1))
    assert all(torch.equal(weights(loaded)[k], results[0]["weights"][k]) for k in results[0]["weights"])


def test_fsdp_checkpoint_is_complete_or_absent(tmp_path, monkeypatch):
    """A save that fails midway (after the shards, before the rename) leaves no checkpoint that loads."""
    import torch.distributed.checkpoint as dcp

    real_save, calls = dcp.save, []

    def failing_save(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        real_save(*args, **kwargs)
        if len(calls) == 3:
            raise OSError("the disk went away")

    monkeypatch.setattr(dcp, "save", failing_save)
    with pytest.raises(OSError, match="went away"):
        mlp_run(strategy="fsdp", checkpoint_dir=tmp_path, checkpoint_every=1, **FSDP_MLP)
    assert (tmp_path / ".step-000000003.sharded-tmp" / ".metadata").exists()  # shards written, never completed
    (tmp_path / "step-000000007").mkdir()  # a folder without the marker
    assert [p.name for p in sharded_checkpoint.list_sharded(tmp_path)] == ["step-000000002", "step-000000001"]
    monkeypatch.setattr(dcp, "save", real_save)
    trainer, model, _ = mlp_run(strategy="fsdp", checkpoint_dir=tmp_path, checkpoint_every=1, resume=True,
                                **FSDP_MLP)
    _, single, _ = mlp_run(**FSDP_MLP)
    assert trainer.step == 8
    assert_same(weights(model), weights(single))
    assert not (tmp_path / ".step-000000003.sharded-tmp").exists()  # the next save of step 3 replaced it


def test_fsdp_checkpoint_of_another_model_is_refused(tmp_path):
    mlp_run(strategy="fsdp", checkpoint_dir=tmp_path, **FSDP_MLP)
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    trainer = Trainer(model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=64,
                      progress=False, strategy="fsdp", checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="another model"):
        trainer.fit(mlp_data(), epochs=3, resume=True)


def test_auto_micro_batch_is_measured_on_every_rank_and_the_smallest_fit_wins(forkserver, tmp_path):
    """``micro_batch_size="auto"`` with DDP and FSDP: every rank measures its own (sharded) step, and the
    ranks agree on the fit of the rank with the least memory, whichever rank that is; batch means batch."""
    ranks = [result_of(o) for o in launch(forkserver, tmp_path, "auto_fit")]
    small, large = f"{SMALL_BUDGET:.0e}", f"{LARGE_BUDGET:.0e}"
    for result in ranks:
        assert result[f"fsdp micro_batch_size {large}/{large}"]["micro"] is None  # the whole share fits
        fit = result[f"fsdp micro_batch_size {small}/{small}"]["micro"]
        assert fit is not None and 1 <= fit < LLAMA_BATCH  # the small budget binds
        # One rank small: both use the small fit. Each run measures again, and a step's peak moves a little
        # between runs (gloo frees its buffers on threads of its own, in the profiler's events too), so a fit at
        # the edge of the budget may differ by one sample from the small/small run's; every rank of a run agrees
        # exactly (below).
        for key in (f"{large}/{small}", f"{small}/{large}"):
            assert abs(result[f"fsdp micro_batch_size {key}"]["micro"] - fit) <= 1
        tokens = result[f"fsdp micro_batch_tokens {large}/{small}"]["tokens"]
        longest = int(token_data()["input_ids_lengths"].max())  # a token budget is rows of the longest sample
        assert tokens is not None and tokens % longest == 0 and longest <= tokens < longest * LLAMA_BATCH // WORLD
        ddp_fit = result[f"ddp micro_batch_size {small}/{small}"]["micro"]
        assert ddp_fit is not None and 1 <= ddp_fit < LLAMA_BATCH
        assert abs(result[f"ddp micro_batch_size {large}/{small}"]["micro"] - ddp_fit) <= 1  # as above
        assert all(run["batch"] == LLAMA_BATCH and run["steps"] == LLAMA_SAMPLES // LLAMA_BATCH
                   for run in result.values())  # batch_size unchanged
    for key in ranks[0]:
        assert ranks[0][key]["micro"] == ranks[1][key]["micro"] and ranks[0][key]["tokens"] == ranks[1][key]["tokens"]
    reference = llama_reference()  # whole batches by hand: the measured split does not change the result
    assert_same(ranks[0][f"fsdp micro_batch_size {large}/{small}"]["weights"], reference)
    assert_same(ranks[0][f"ddp micro_batch_size {large}/{small}"]["weights"], reference)


def test_fsdp_exception_on_one_rank_fails_the_other_fast(forkserver, tmp_path):
    outcomes = launch(forkserver, tmp_path, "failure")
    assert outcomes[1]["error"] == "ValueError" and "rank 1 cannot go on" in outcomes[1]["message"]
    other = result_of(outcomes[0])
    assert other["error"] == "DistributedError"
    assert "rank 1 failed: ValueError: rank 1 cannot go on" in other["message"]
    assert other["seconds"] < 30  # not the 300 s timeout


def test_checkpoints_of_the_other_strategy_are_refused(tmp_path):
    mlp_run(strategy="fsdp", checkpoint_dir=tmp_path / "fsdp", **FSDP_MLP)
    with pytest.raises(CheckpointError, match="checkpoints of strategy='fsdp'"):
        mlp_run(checkpoint_dir=tmp_path / "fsdp", resume=True)
    mlp_run(checkpoint_dir=tmp_path / "ddp")
    with pytest.raises(CheckpointError, match="checkpoints of strategy='ddp'"):
        mlp_run(strategy="fsdp", checkpoint_dir=tmp_path / "ddp", resume=True)


def test_cli_train_nproc_2_fsdp(tmp_path):
    """``[train] strategy = "fsdp"`` end to end: rank 0 writes the run folder and one ordinary model file."""
    x, y = mlp_data()
    np.savez(tmp_path / "train.npz", x=x, y=y)
    config = tmp_path / "run.toml"
    config.write_text('[data]\ntrain = "train.npz"\nval_split = 0.2\n\n[model]\nname = "mlp"\n\n'
                      '[train]\nepochs = 1\nbatch_size = 32\nprogress = false\ndevice = "cpu"\nstrategy = "fsdp"\n')
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.path.dirname(os.path.dirname(batchfit.__file__)))
    done = subprocess.run([sys.executable, "-m", "batchfit", "train", str(config), "--nproc", "2",
                           "--out", str(tmp_path / "runs")], capture_output=True, text=True, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout[done.stdout.index("{"):])
    assert summary["world_size"] == 2 and summary["steps"] == 6  # ceil(162 / 32)
    record = torch.load(Path(summary["run_dir"]) / "model.pt", weights_only=True)
    assert all(type(v) is torch.Tensor for v in record["model"].values()) and record["model"]


@pytest.mark.parametrize("option", ["micro_batch_size", "micro_batch_tokens"])
def test_fsdp_auto_fit_on_cuda_is_refused_with_the_reason(monkeypatch, option):
    """On CUDA the search runs into out-of-memory errors, which a sharded step cannot survive on one rank alone."""
    from batchfit.distributed import DistContext
    from batchfit.train import plan
    from batchfit.train.options import TrainerOptions

    monkeypatch.setattr(plan, "is_sharded", lambda module: True)  # as if fully_shard had wrapped it
    model = mlp()
    options = TrainerOptions(batch_size=64, strategy="fsdp", **{option: "auto"})
    with pytest.raises(BatchfitError, match="leaves the other ranks waiting"):
        plan.plan_batches(options, model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                          ArraySource(*mlp_data()), torch.device("cuda"), DistContext(), [0.1])
    monkeypatch.setattr(plan, "is_sharded", lambda module: False)  # DDP's unwrapped module: measured on CUDA
    with pytest.raises(Exception) as other:
        plan.plan_batches(options, model, F.cross_entropy, torch.optim.SGD(model.parameters(), lr=0.1),
                          ArraySource(*mlp_data()), torch.device("cuda"), DistContext(), [0.1])
    assert "leaves the other ranks waiting" not in str(other.value)
