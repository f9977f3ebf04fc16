"""examples/omniglot.py --download on a fresh machine: the data root is created and the minimal split's zips and
Lake's runs are fetched (from file:// copies standing in for GitHub); offline, a short message names the URL and
the file to place by hand, without a traceback. Needs no shared data."""
import json
import os
import socket
import subprocess
import sys

import pytest

from paddlefsl.datasets import file_digests
from tests.examples.scripts import ROOT, run_example

# Runs examples/omniglot.py with OMNIGLOT_FILES replaced by the JSON in $TEST_OMNIGLOT_FILES.
LAUNCH = """
import json, os, runpy, sys
from paddlefsl.datasets import omniglot
omniglot.OMNIGLOT_FILES.clear()
omniglot.OMNIGLOT_FILES.update(json.loads(os.environ["TEST_OMNIGLOT_FILES"]))
sys.argv = ["examples/omniglot.py", *sys.argv[1:]]
runpy.run_path("examples/omniglot.py", run_name="__main__")
"""
SHORT = ["--iterations", "2", "--meta-batch", "2", "--eval-tasks", "3", "--query", "2", "--test-inner-steps", "1"]


@pytest.fixture
def server(synthetic_omniglot):
    """OMNIGLOT_FILES entries serving the synthetic minimal split and all_runs.zip from file:// URLs."""
    return {path.name: {"url": path.as_uri(), "sha256": file_digests(str(path), ("sha256",))["sha256"]}
            for path in synthetic_omniglot.iterdir()}


def _launch(files: dict, *args):
    return subprocess.run([sys.executable, "-c", LAUNCH, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "TEST_OMNIGLOT_FILES": json.dumps(files)})


def test_download_creates_the_data_root_and_fetches_the_minimal_split(tmp_path, server):
    data = tmp_path / "fresh" / "omniglot"                         # does not exist yet
    run = _launch(server, "--data-root", data, "--out", tmp_path / "run", "--download", *SHORT)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(p.name for p in data.glob("*.zip")) == sorted(server)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert 0 <= results["test_accuracy"] <= 1 and 0 <= results["lake_20way_one_shot_error"] <= 1


def test_offline_download_says_what_failed_and_how_to_place_the_file(tmp_path, server):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                                 # closed again: connections are refused
    offline = {name: {**entry, "url": f"http://127.0.0.1:{port}/{name}"} for name, entry in server.items()}
    data = tmp_path / "omniglot"
    run = _launch(offline, "--data-root", data, "--out", tmp_path / "run", "--download", *SHORT)
    assert run.returncode == 1
    # one line of error, last, and no traceback (Paddle's own import-time warnings may come before it: "No ccache
    # found", and one about OMP_NUM_THREADS when it is set above 1)
    assert "Traceback" not in run.stderr, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("omniglot.py: error: could not download"), run.stderr
    assert f"http://127.0.0.1:{port}/images_background_small1.zip" in run.stderr
    assert str(data / "images_background_small1.zip") in run.stderr and "by hand" in run.stderr


def test_missing_zips_without_download_point_to_the_download_option(tmp_path):
    run = run_example("omniglot.py", "--data-root", tmp_path, "--out", tmp_path / "run", *SHORT)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "images_background_small1.zip not found" in run.stderr and "--download" in run.stderr


def test_missing_data_root_points_to_the_download_option(tmp_path):
    run = run_example("omniglot.py", "--data-root", tmp_path / "nowhere", "--out", tmp_path / "run")
    assert run.returncode == 2 and "is not a folder" in run.stderr and "--download" in run.stderr
