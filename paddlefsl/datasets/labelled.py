"""LabelledImages: the indexing shared by the image datasets (``images``, ``labels``, ``class_names``)."""
from __future__ import annotations

from typing import Any, Tuple

import numpy as np
import paddle


class LabelledImages(paddle.io.Dataset):
    """A dataset of ``(image, label)`` items read from ``self.images`` and ``self.labels``.

    Subclasses set ``images`` (array-like, indexable by int), ``labels`` (int64 array), ``class_names`` and
    ``transform`` (a callable applied to each image in ``__getitem__``, or None).
    """

    images: Any
    labels: np.ndarray
    class_names: list
    transform: Any

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.class_names)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> Tuple[Any, np.int64]:
        image = self.images[int(idx)]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[int(idx)]
