"""The public surface: a sorted ``__all__`` whose every name resolves."""

import batchfit


def test_all_is_sorted():
    assert list(batchfit.__all__) == sorted(batchfit.__all__)


def test_all_names_resolve():
    missing = [name for name in batchfit.__all__ if not hasattr(batchfit, name)]
    assert missing == []


def test_all_has_no_duplicates():
    assert len(set(batchfit.__all__)) == len(batchfit.__all__)


def test_errors_subclass_value_error():
    for name in ("BatchfitError", "CheckpointError", "NonFiniteLossError", "ShardError", "DistributedError"):
        assert issubclass(getattr(batchfit, name), ValueError), name


def test_check_choice_refuses_ints_posing_as_bools():
    import numpy as np
    import pytest

    import batchfit as bf

    with pytest.raises(ValueError, match="`shuffle` must be one of False, True, 'full', 'block'. Received: shuffle=1"):
        bf.Batcher((np.zeros((4, 1)), np.zeros(4)), batch_size=2, shuffle=1)
