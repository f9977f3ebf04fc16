"""Plain ``paddle.nn.Layer`` backbones for few-shot learning (no meta-learning code).

Every classifier exposes a ``features`` part and a linear ``head`` separately, so that ANIL-style
methods can adapt the head only.
"""
from .conv import Conv4
from .mlp import MLP
from .resnet import ResNet12, ResNet12Block

__all__ = ["Conv4", "MLP", "ResNet12", "ResNet12Block"]
