"""A synthetic Omniglot minimal split, so that the example scripts' own behaviour is tested without the real data."""
import pytest

from tests.datasets.conftest import make_omniglot_zip, make_runs_zip


@pytest.fixture
def synthetic_omniglot(tmp_path):
    """A folder with small1 (alphabets A, B: 6 characters, 24 rotated classes), small2 (A, C, D: the 6 characters
    of C and D are the test classes) and a two-run all_runs.zip, in the official layouts."""
    folder = tmp_path / "synthetic-omniglot"
    folder.mkdir()
    make_omniglot_zip(folder / "images_background_small1.zip", "images_background_small1", {"A": 3, "B": 3})
    make_omniglot_zip(folder / "images_background_small2.zip", "images_background_small2", {"A": 2, "C": 3, "D": 3},
                      start_id=6)
    make_runs_zip(folder / "all_runs.zip", n_runs=2, n_classes=20, size=24)
    return folder
