"""The language-model options: length-grouped shuffles, token-budget batches, gradient checkpointing
and LoRA adapters — each compared with what it must leave unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from batchfit import ArraySource, Batcher, Trainer
from batchfit.core.recompute import enable_gradient_checkpointing
from batchfit.errors import BatchfitError

# The text and lora extras (.ci/run installs them): without them these tests skip.
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from test_token_mean import tiny_llama, token_data, weights  # noqa: E402


def lengths_source(num: int = 500, seed: int = 0) -> ArraySource:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 60, num)
    ids = np.arange(num)[:, None] * np.ones((1, 60), dtype=np.int64)  # every row holds its own index
    return ArraySource(input_ids=ids, input_ids_lengths=lengths)


def served(batcher: Batcher) -> list[np.ndarray]:
    return [batch["input_ids"][:, 0].numpy() for batch in batcher.remaining()]


def padding(batches: list[dict]) -> float:
    padded = sum(len(b["input_ids_lengths"]) * int(b["input_ids_lengths"].max()) for b in batches)
    return 1 - sum(int(b["input_ids_lengths"].sum()) for b in batches) / padded


@pytest.mark.parametrize("options", [{"shuffle": "length"}, {"shuffle": "length", "batch_tokens": 300},
                                     {"shuffle": True, "batch_tokens": 300}, {"shuffle": False, "batch_tokens": 1}])
def test_every_sample_once_per_epoch(options):
    batcher = Batcher(lengths_source(), 32, seed=3, **options)
    for epoch in range(2):
        batcher.set_epoch(epoch)
        seen = np.concatenate(served(batcher))
        assert sorted(seen.tolist()) == list(range(500))


def test_length_grouping_pads_less_and_differs_by_epoch():
    src = lengths_source()
    grouped = Batcher(src, 32, shuffle="length", seed=1)
    uniform = Batcher(src, 32, shuffle=True, seed=1)
    assert padding(list(grouped.remaining())) < 0.5 * padding(list(uniform.remaining()))
    grouped.set_epoch(1)
    first = served(Batcher(src, 32, shuffle="length", seed=1))
    assert not all(np.array_equal(a, b) for a, b in zip(first, served(grouped)))


def test_token_batches_stay_within_the_budget():
    batches = list(Batcher(lengths_source(), 64, shuffle="length", seed=2, batch_tokens=300).remaining())
    for batch in batches:
        rows, longest = len(batch["input_ids_lengths"]), int(batch["input_ids_lengths"].max())
        assert rows * longest <= 300 or rows == 1
        assert rows <= 64
    assert len({len(b["input_ids_lengths"]) for b in batches}) > 3  # the number of samples varies


@pytest.mark.parametrize("options", [{"shuffle": "length"}, {"shuffle": "length", "batch_tokens": 300}])
def test_resume_mid_epoch_and_ranks_give_the_same_batches(options):
    src = lengths_source()
    whole = served(Batcher(src, 32, seed=5, **options))
    first = Batcher(src, 32, seed=5, **options)
    iterator = iter(first.remaining())
    for _ in range(4):
        next(iterator)
    resumed = Batcher(src, 32, seed=5, **options)
    resumed.load_state_dict(first.state_dict())
    assert all(np.array_equal(a, b) for a, b in zip(served(resumed), whole[4:], strict=True))
    ranks = [served(Batcher(src, 32, seed=5, rank=r, world_size=2, **options)) for r in range(2)]
    for batch, zero, one in zip(whole, *ranks, strict=True):
        assert np.array_equal(np.concatenate([zero, one]), batch)


def test_length_and_token_options_refuse_sources_without_lengths():
    plain = ArraySource(np.zeros((10, 3)), np.zeros(10))
    with pytest.raises(ValueError, match="'length' only for a source with variable-length arrays"):
        Batcher(plain, 4, shuffle="length").order()
    with pytest.raises(ValueError, match="batch_tokens"):
        Batcher(plain, 4, batch_tokens=100)
    state = Batcher(lengths_source(), 4, batch_tokens=100).state_dict()
    with pytest.raises(BatchfitError, match="batch_tokens=100"):
        Batcher(lengths_source(), 4).load_state_dict(state)


def test_micro_batch_tokens_needs_variable_length_arrays():
    model = torch.nn.Linear(3, 1)
    trainer = Trainer(model, torch.nn.functional.mse_loss, torch.optim.SGD(model.parameters(), lr=0.1),
                      batch_size=4, micro_batch_tokens=8, progress=False)
    with pytest.raises(BatchfitError, match="micro_batch_tokens needs variable-length arrays"):
        trainer.fit((np.zeros((8, 3), np.float32), np.zeros((8, 1), np.float32)), epochs=1)


# ---------------------------------------------------------------- gradient checkpointing


class Blocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem = torch.nn.Linear(6, 16)
        self.layers = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Dropout(0.3),
                                                               torch.nn.GELU()) for _ in range(3)])
        self.head = torch.nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def fit_blocks(**options) -> dict[str, torch.Tensor]:
    model = Blocks()
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(64, 6)).astype(np.float32), rng.integers(0, 2, 64)
    trainer = Trainer(model, torch.nn.functional.cross_entropy, torch.optim.Adam(model.parameters(), lr=1e-2),
                      batch_size=16, progress=False, seed=0, **options)
    torch.manual_seed(1)
    trainer.fit((x, y), epochs=2)
    return weights(model)


def test_gradient_checkpointing_leaves_the_weights_unchanged_even_with_dropout():
    plain, recomputed = fit_blocks(), fit_blocks(gradient_checkpointing=True)
    for key in plain:
        torch.testing.assert_close(recomputed[key], plain[key], rtol=1e-6, atol=1e-7)


def test_gradient_checkpointing_recomputes_blocks():
    model = Blocks()
    calls = []
    model.layers[0][0].register_forward_hook(lambda *_: calls.append(1))
    assert "3 blocks of layers" in enable_gradient_checkpointing(model)
    model(torch.randn(4, 6)).sum().backward()
    assert len(calls) == 2  # forward, then again in the backward pass
    with torch.no_grad():
        model(torch.randn(4, 6))
    assert len(calls) == 3


def test_gradient_checkpointing_of_a_hugging_face_model_is_its_own_switch():
    data = token_data(32)
    results = []
    for checkpointing in (False, True):
        model = tiny_llama()
        trainer = Trainer(model, None, torch.optim.SGD(model.parameters(), lr=0.5), batch_size=16, shuffle=False,
                          progress=False, gradient_checkpointing=checkpointing)
        trainer.fit(ArraySource(**data), epochs=1)
        results.append(weights(model))
        if checkpointing:
            assert model.is_activation_checkpointing
    for key in results[0]:
        torch.testing.assert_close(results[1][key], results[0][key], rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_refuses_a_model_without_blocks():
    with pytest.raises(BatchfitError, match="gradient_checkpointing=True needs blocks"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------- LoRA adapters


def lora_llama() -> torch.nn.Module:
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    model = peft.get_peft_model(tiny_llama(), config)
    torch.manual_seed(7)
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero; nonzero makes the adapters' effect visible at once
            torch.nn.init.normal_(parameter, std=0.05)
    return model


def test_lora_checkpoints_hold_only_the_adapters_and_resume_exactly(tmp_path):
    data = token_data(64)

    def run(epochs: int, resume: bool) -> tuple[torch.nn.Module, Trainer]:
        model = lora_llama()
        trainer = Trainer(model, None, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2),
                          batch_size=16, progress=False, checkpoint_dir=tmp_path / "ckpt", checkpoint_every=1)
        trainer.fit(ArraySource(**data), epochs=epochs, resume=resume)
        return model, trainer

    frozen_before = {k: v.clone() for k, v in lora_llama().state_dict().items() if "lora" not in k}
    straight, _ = run(2, resume=False)
    for key, value in straight.state_dict().items():
        if "lora" not in key:
            assert torch.equal(value, frozen_before[key]), key  # the base model is not trained
    checkpoint = torch.load(sorted((tmp_path / "ckpt").glob("*.pt"))[-1], weights_only=False)
    assert checkpoint["model"] and all("lora_" in key for key in checkpoint["model"])
    trainable = sum(p.numel() for p in straight.parameters() if p.requires_grad)
    assert sum(v.numel() for v in checkpoint["model"].values()) == trainable

    import shutil
    shutil.rmtree(tmp_path / "ckpt")
    run(1, resume=False)  # stops after epoch 1
    resumed, trainer = run(2, resume=True)
    assert trainer.step == 8
    for key, value in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


def test_lora_saved_model_loads_into_a_fresh_adapter_model(tmp_path):
    import batchfit as bf

    model = lora_llama()
    trainer = Trainer(model, None, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1),
                      batch_size=16, progress=False)
    trainer.fit(ArraySource(**token_data(32)), epochs=1)
    path = trainer.save(tmp_path / "adapters.pt")
    assert path.stat().st_size < 200_000  # adapters only, not the base model
    fresh = bf.load_model(path, lora_llama())
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert isinstance(fresh, peft.PeftModel) and isinstance(transformers.LlamaForCausalLM, type)


# ---------------------------------------------------------------- token budget measured


def test_find_micro_batch_tokens_measures_copies_of_the_longest_sample():
    import batchfit as bf

    data = token_data(48)
    longest = int(data["input_ids_lengths"].max())
    model = tiny_llama()
    roomy = bf.find_micro_batch_tokens(model, None, ArraySource(**data), device="cpu", max_rows=16,
                                       memory_budget=2**34)
    assert roomy == 16 * longest  # everything fits: the cap
    from batchfit.measure.memory import measure_step_peak

    one_row = measure_step_peak(model, None, ArraySource(**{k: v[data["input_ids_lengths"] == longest][:1]
                                                               for k, v in data.items()}), 1, device="cpu")
    tight = bf.find_micro_batch_tokens(model, None, ArraySource(**data), device="cpu", max_rows=16,
                                       memory_budget=3 * one_row)
    assert tight % longest == 0 and longest <= tight < roomy
    with pytest.raises(ValueError, match="variable-length arrays"):
        bf.find_micro_batch_tokens(model, None, ArraySource(np.zeros((4, 2)), np.zeros(4)))


def test_micro_batch_tokens_auto_trains_the_weights_of_one_batch():
    from test_token_mean import BATCH, batchfit_run, plain_loop

    data = token_data()
    assert BATCH == 32
    measured = batchfit_run(data, micro_batch_tokens="auto")
    for key, value in plain_loop(data).items():
        torch.testing.assert_close(measured[key], value, rtol=1e-5, atol=1e-5)


def test_validation_accuracy_of_a_hugging_face_classifier_without_a_metric():
    config = transformers.BertConfig(vocab_size=61, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    data = token_data(40)
    labels = np.arange(40) % 3
    source = ArraySource(input_ids=data["input_ids"], input_ids_lengths=data["input_ids_lengths"], labels=labels)
    trainer = Trainer(model, None, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=8, progress=False)
    result = trainer.evaluate(source)
    model.eval()
    with torch.no_grad():
        lengths = torch.from_numpy(data["input_ids_lengths"])
        mask = (torch.arange(24)[None, :] < lengths[:, None]).long()
        logits = model(input_ids=torch.from_numpy(data["input_ids"]), attention_mask=mask).logits
    assert result["accuracy"] == pytest.approx(float((logits.argmax(-1) == torch.from_numpy(labels)).float().mean()))


def test_a_causal_lm_gets_no_token_accuracy_from_its_logits():
    model = tiny_llama()
    trainer = Trainer(model, None, torch.optim.SGD(model.parameters(), lr=0.1), batch_size=8, progress=False)
    assert "accuracy" not in trainer.evaluate(ArraySource(**token_data(16)))


def test_tune_on_variable_length_data_recommends_a_token_budget():
    import batchfit as bf

    data = token_data(64)
    longest = int(data["input_ids_lengths"].max())
    report = bf.tune(tiny_llama, None, lambda model: torch.optim.AdamW(model.parameters(), lr=1e-3),
                     ArraySource(**data), base_batch_size=8, batch_sizes=[8, 16], epochs=1, device="cpu",
                     memory_budget=2**32)
    assert report.micro_batch_tokens == report.micro_batch_fit * longest
    assert f"micro_batch_tokens = {report.micro_batch_tokens}" in report.config_block()
    assert f"longest sample ({longest} tokens)" in report.reasons["micro_batch_tokens"]
