import os

import numpy as np
import paddle
import pytest

os.environ.setdefault("PADDLEFSL_DATA", os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data"))


@pytest.fixture(autouse=True)
def _float64_and_seed():
    """Every test starts in float64 with fixed seeds and leaves the default dtype as it found it."""
    before = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    paddle.seed(0)
    np.random.seed(0)
    yield
    paddle.set_default_dtype(before)
