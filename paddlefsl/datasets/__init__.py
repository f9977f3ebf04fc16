"""Few-shot datasets: Omniglot (+ Lake's one-shot runs), miniImageNet, FewRel."""
from .download import download_file, file_digests, verify_file
from .errors import CorruptDatasetError, DatasetNotFoundError
from .omniglot import Omniglot, OmniglotOneShotRuns, RotatedImages, evaluate_one_shot_runs

__all__ = ["Omniglot", "OmniglotOneShotRuns", "RotatedImages", "evaluate_one_shot_runs",
           "DatasetNotFoundError", "CorruptDatasetError", "download_file", "file_digests", "verify_file"]
