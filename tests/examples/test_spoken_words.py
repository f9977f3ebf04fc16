"""examples/spoken_words.py end to end on the Free Spoken Digit Dataset: beats chance, writes the outputs, resumes
exactly, and names a corrupt or truncated WAV. Needs the `speech` extra; skipped without it or without the data."""
import io
import json
import os
import wave
import zipfile
from pathlib import Path

import numpy as np
import pytest

from tests.examples.scripts import ROOT, read_checkpoint, run_example

pytestmark = pytest.mark.speech
pytest.importorskip("paddlespeech.kws", reason="PaddleSpeech is not installed (see the `speech` extra)")
DATA = Path(os.environ.get("PADDLEFSL_DATA", ROOT.parent / "shared" / "data")) / "fsdd"
needs_data = pytest.mark.skipif(not (DATA / "recordings.zip").exists(), reason=f"FSDD not found in {DATA}")
TINY = ["--channels", "8", "--mels", "20", "--seconds", "0.5", "--query", "3"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One feature cache for the module's runs (the first run fills it)."""
    return tmp_path_factory.mktemp("fsdd-cache")


def _spoken(out: Path, cache_dir: Path, *extra, data=DATA):
    return run_example("spoken_words.py", "--data-root", data, "--out", out, "--cache-dir", cache_dir, *TINY, *extra)


@needs_data
def test_short_baseline_run_beats_chance_and_writes_everything(tmp_path, cache):
    run = _spoken(tmp_path, cache, "--algorithm", "baseline", "--iterations", "100", "--eval-tasks", "100",
                  "--log-every", "20", "--batch-size", "32", "--finetune-steps", "30")
    assert run.returncode == 0, run.stderr[-3000:]
    assert len(list(cache.glob("fsdd-logmel-*.npz"))) == 1
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["test_accuracy"] - results["test_ci95"] > 0.2, results  # chance is 0.2
    assert (tmp_path / "learning_curve.png").stat().st_size > 5000
    keys = set(read_checkpoint(tmp_path)["model"])
    assert "head.weight" in keys and any(k.startswith("features.mdtc.") for k in keys)


@needs_data
def test_short_anil_run_beats_chance(tmp_path, cache):
    """ANIL with the default zero head: 80 meta-iterations take it clear of chance. With ``--head-init random`` the
    same run stayed at chance (the random head's per-episode bias is all one inner step can undo)."""
    run = _spoken(tmp_path, cache, "--algorithm", "anil", "--iterations", "80", "--meta-batch", "2", "--inner-lr", "1",
                  "--test-inner-steps", "1", "--eval-tasks", "100", "--log-every", "10")
    assert run.returncode == 0, run.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["test_accuracy"] - results["test_ci95"] > 0.25, results  # chance is 0.2


@needs_data
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, cache):
    common = ["--algorithm", "maml", "--model", "ecapa", "--meta-batch", "2", "--eval-tasks", "2",
              "--checkpoint-every", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert _spoken(straight, cache, "--iterations", "4", *common).returncode == 0
    assert _spoken(split, cache, "--iterations", "2", *common).returncode == 0
    resumed = _spoken(split, cache, "--iterations", "4", "--resume", *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = read_checkpoint(straight)["model"], read_checkpoint(split)["model"]
    assert a.keys() == b.keys() and any(k.startswith("features.ecapa.") for k in a)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def _wav(samples: int) -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(8000)
        w.writeframes((np.sin(np.arange(samples) / 3) * 8000).astype("<i2").tobytes())
    return buf.getvalue()


@pytest.mark.parametrize("case,message", [
    ("corrupt", "recordings/3_lucas_7.wav: not a readable WAV file"),
    ("truncated", "recordings/3_lucas_7.wav: 100 samples is too short"),
    ("name", "recordings/3_bob_7.wav: expected a name DIGIT_SPEAKER_INDEX.wav"),
])
def test_a_bad_recording_is_named(tmp_path, case, message):
    root = tmp_path / "data"
    root.mkdir()
    with zipfile.ZipFile(root / "recordings.zip", "w") as z:
        for digit in range(2):
            z.writestr(f"recordings/{digit}_george_0.wav", _wav(4000))
        bad = {"corrupt": b"RIFF\x00\x01garbage", "truncated": _wav(100), "name": _wav(4000)}[case]
        z.writestr("recordings/3_bob_7.wav" if case == "name" else "recordings/3_lucas_7.wav", bad)
    run = _spoken(tmp_path / "out", tmp_path / "cache", "--iterations", "1", data=root)
    assert run.returncode == 2 and "Traceback" not in run.stderr, run.stderr[-2000:]
    assert message in run.stderr, run.stderr[-2000:]
