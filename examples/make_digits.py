"""Write scikit-learn's handwritten digits as .npz files for examples/digits.toml.

    python examples/make_digits.py        # -> examples/data/digits_train.npz, digits_test.npz
"""

from pathlib import Path

import numpy as np

from batchfit.demo import load_digits_split

out = Path(__file__).parent / "data"
out.mkdir(exist_ok=True)
x_train, x_test, y_train, y_test = load_digits_split()
np.savez(out / "digits_train.npz", x=x_train, y=y_train)
np.savez(out / "digits_test.npz", x=x_test, y=y_test)
print(f"wrote {out}/digits_train.npz ({len(y_train)} images) and digits_test.npz ({len(y_test)} images)")
