"""Training utilities: checkpoints with exact resume, JSONL metrics, learning-curve plots."""
from .checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from .metrics import JSONLLogger, read_jsonl
from .plots import learning_curve_figure, plot_learning_curve

__all__ = ["save_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state",
           "JSONLLogger", "read_jsonl", "learning_curve_figure", "plot_learning_curve"]
