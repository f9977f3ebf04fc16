"""paddlefsl: few-shot and meta-learning for PaddlePaddle with exact meta-gradients."""
from paddlefsl.dependencies import import_paddle as _import_paddle

__version__ = "2.0.0"

_import_paddle()
