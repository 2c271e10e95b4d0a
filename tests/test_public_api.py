"""The public surface: a sorted ``__all__`` whose every name resolves."""

import batchfit


def test_all_is_sorted():
    assert list(batchfit.__all__) == sorted(batchfit.__all__)


def test_all_names_resolve():
    missing = [name for name in batchfit.__all__ if not hasattr(batchfit, name)]
    assert missing == []


def test_all_has_no_duplicates():
    assert len(set(batchfit.__all__)) == len(batchfit.__all__)


def test_refusals_are_value_errors_and_failures_while_training_are_not():
    for name in ("InputError", "CheckpointError", "ShardError", "ConfigError"):
        assert issubclass(getattr(batchfit, name), ValueError), name
    for name in ("NonFiniteLossError", "DistributedError", "StreamError"):
        error = getattr(batchfit, name)
        assert issubclass(error, RuntimeError) and not issubclass(error, ValueError), name
    for name in ("InputError", "CheckpointError", "ShardError", "ConfigError", "NonFiniteLossError",
                 "DistributedError", "StreamError"):
        assert issubclass(getattr(batchfit, name), batchfit.BatchfitError), name
    try:
        batchfit.Batcher(batchfit.ArraySource(__import__("numpy").zeros((4, 2))), batch_size=0)
    except ValueError as error:  # a refused argument is still caught as a ValueError
        assert isinstance(error, batchfit.InputError) and "batch_size" in str(error)
    else:
        raise AssertionError("batch_size=0 was accepted")


def test_check_choice_refuses_ints_posing_as_bools():
    import numpy as np
    import pytest

    import batchfit as bf

    with pytest.raises(ValueError,
                       match="`shuffle` must be one of False, True, 'full', 'block', 'length'. Received: shuffle=1"):
        bf.Batcher((np.zeros((4, 1)), np.zeros(4)), batch_size=2, shuffle=1)


# Names from before the namespaces: importable from the top, outside __all__, each the namespace's own object.
OLDER = {"CSVLogger": "callbacks", "EarlyStopping": "callbacks", "ModelCheckpoint": "callbacks",
         "TensorBoardLogger": "callbacks", "verify_shards": "shards", "DeadLetter": "streams",
         "EventConsumer": "streams", "PublishSnapshots": "streams", "RedisStream": "streams",
         "StreamSource": "streams", "load_snapshot": "streams", "find_micro_batch_tokens": "text",
         "load_text_model": "text", "load_tokenizer": "text", "prepare_corpus": "text", "write_text_shards": "text"}


def test_all_is_every_public_non_module_name_but_the_older_ones():
    import types

    public = {name for name, value in vars(batchfit).items()
              if not name.startswith("_") and not isinstance(value, types.ModuleType)}
    assert public == set(batchfit.__all__) | set(OLDER)
    assert len(batchfit.__all__) <= 30


def test_namespaces_hold_the_older_names():
    for name, namespace in OLDER.items():
        module = getattr(batchfit, namespace)
        inside = "verify" if name == "verify_shards" else name
        assert getattr(module, inside) is getattr(batchfit, name), name
        assert inside in module.__all__, name
    for namespace in ("text", "streams", "shards", "callbacks", "images"):
        module = getattr(batchfit, namespace)
        assert list(module.__all__) == sorted(module.__all__) and all(hasattr(module, n) for n in module.__all__)
    assert batchfit.text.load_pretrained is batchfit.text.load_text_model  # named by what it loads


def test_exported_objects_say_they_live_in_batchfit():
    elsewhere = [name for name in batchfit.__all__ if getattr(batchfit, name).__module__ != "batchfit"]
    assert elsewhere == []


def test_every_error_is_in_the_one_hierarchy_drawn_in_errors_docstring():
    from batchfit import errors

    classes = [value for value in vars(errors).values()
               if isinstance(value, type) and issubclass(value, Exception) and value.__module__ in
               ("batchfit", "batchfit.errors")]
    assert {cls.__name__ for cls in classes} >= {"BatchfitError", "ConfigError"}
    for cls in classes:
        assert issubclass(cls, batchfit.BatchfitError), cls
        assert cls.__name__ in errors.__doc__, f"{cls.__name__} is not drawn in errors.py's docstring"
        assert getattr(batchfit, cls.__name__) is cls, f"{cls.__name__} is not exported"
