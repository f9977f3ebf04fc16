"""Few-shot datasets: Omniglot (+ Lake's one-shot runs), miniImageNet, FewRel."""
from .download import download_file, file_digests, verify_file
from .errors import CorruptDatasetError, DatasetNotFoundError, DownloadError
from .fewrel import FewRel, mark_entities
from .miniimagenet import IMAGENET_MEAN, IMAGENET_STD, MiniImageNet, NormalizedImages
from .omniglot import Omniglot, OmniglotOneShotRuns, RotatedImages, evaluate_one_shot_runs

__all__ = ["Omniglot", "OmniglotOneShotRuns", "RotatedImages", "evaluate_one_shot_runs", "MiniImageNet",
           "NormalizedImages", "IMAGENET_MEAN", "IMAGENET_STD", "FewRel", "mark_entities", "DatasetNotFoundError",
           "CorruptDatasetError", "DownloadError", "download_file", "file_digests", "verify_file"]
