"""Which errors of a collective mean "another rank is gone": a table of the messages seen, and the types."""

import pytest
import torch.distributed as dist

from batchfit.distributed import _first_line, _is_peer_gone
from batchfit.errors import DistributedError

PEER_GONE = [
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:4567",
    "[../third_party/gloo/gloo/transport/tcp/pair.cc:598] Connection reset by peer",
    "Application timeout caused pair closure",
    "[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 300000ms for recv "
    "operation to complete",
    "Broken pipe",
    "Connection refused",
    "NCCL communicator was aborted on rank 1.",
    "Socket Timeout",
    "failed to recv, got 0 bytes: TCPStore closed",
    "Network is unreachable",
]
OWN_ERRORS = [
    "mat1 and mat2 shapes cannot be multiplied (4x5 and 6x3)",
    "CUDA out of memory. Tried to allocate 2.00 GiB",
    "cannot restore the optimizer state",
    "Expected all tensors to be on the same device",
]


@pytest.mark.parametrize("message", PEER_GONE)
def test_is_peer_gone_recognises_collective_failures(message):
    assert _is_peer_gone(RuntimeError(message))


@pytest.mark.parametrize("message", OWN_ERRORS)
def test_is_peer_gone_leaves_a_rank_own_errors_alone(message):
    assert not _is_peer_gone(RuntimeError(message))
    assert not _is_peer_gone(ValueError("Connection closed"))  # only errors collectives raise


@pytest.mark.parametrize("kind", [dist.DistError, dist.DistBackendError, dist.DistNetworkError, dist.DistStoreError])
def test_is_peer_gone_by_type(kind):
    assert _is_peer_gone(kind("anything"))
    assert _is_peer_gone(DistributedError("rank 1 failed"))


def test_first_line_drops_the_source_prefix_and_the_cpp_frames():
    error = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer\n"
                         "Exception raised from recvHook at ../pair.cc:534 (most recent call first):\n"
                         "frame #0: c10::Error::Error(...)\n" * 3)
    assert _first_line(error) == "Connection closed by peer"
