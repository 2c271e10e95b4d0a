"""The benchmarks are not installed: their tests import them from the repository's ``benchmarks/`` folder."""

import sys
from pathlib import Path

ROOT = str(Path(__file__).resolve().parents[2])
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
