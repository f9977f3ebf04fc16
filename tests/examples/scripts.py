"""Run the example scripts as a user would, in a fresh interpreter, and read the checkpoints they write."""
import pickle
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def run_example(script: str, *args) -> subprocess.CompletedProcess:
    """Run ``examples/<script>`` with ``args`` (each passed through ``str``) from the repository root."""
    return subprocess.run([sys.executable, str(ROOT / "examples" / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def read_checkpoint(out: Path) -> dict:
    """The raw contents of ``out/checkpoint.pkl``, read with pickle alone (no paddlefsl), as a plain user would."""
    with open(out / "checkpoint.pkl", "rb") as f:
        return pickle.load(f)
