"""benchmarks/gpu_check.py: a dry run on the CPU. The CUDA checks say SKIP; the rest compare with a hand loop."""

import pytest
import torch

from benchmarks import gpu_check

pytest.importorskip("transformers")


def test_rows_say_pass_fail_or_skip():
    assert gpu_check.row("x", "1", "2", None)["verdict"] == "SKIP"
    assert gpu_check.row("x", "1", "2", True)["verdict"] == "PASS"
    assert gpu_check.row("x", "1", "2", False)["verdict"] == "FAIL"


def test_bf16_check_on_the_cpu_compares_with_the_fp32_hand_loop():
    result = gpu_check.check_bf16(torch.device("cpu"))
    assert result["verdict"] == "PASS", result


def test_cuda_only_checks_skip_on_the_cpu_and_the_table_has_every_check(monkeypatch):
    monkeypatch.setattr(gpu_check, "check_fsdp", lambda device: gpu_check.row("fsdp_nccl", "not run", "", None))
    monkeypatch.setattr(gpu_check, "check_bf16", lambda device: 1 / 0)  # a check that raises is a FAIL row
    rows = gpu_check.checks(torch.device("cpu"), quick=True)
    assert [r["check"] for r in rows] == ["fsdp_nccl", "pinned_prefetch", "bf16_token_loss", "memory_fit",
                                          "out_of_memory"]
    assert [r["verdict"] for r in rows] == ["SKIP", "SKIP", "FAIL", "SKIP", "SKIP"]
    assert "ZeroDivisionError" in rows[2]["measured"]
    assert "| pinned_prefetch | no CUDA device |" in gpu_check.format_rows(torch.device("cpu"), rows)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_every_check_passes_on_a_gpu():
    rows = gpu_check.checks(torch.device("cuda", 0), quick=True)
    assert all(r["verdict"] in ("PASS", "SKIP") for r in rows), gpu_check.format_rows(torch.device("cuda", 0), rows)
