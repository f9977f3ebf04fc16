"""paddlefsl: few-shot and meta-learning for PaddlePaddle with exact meta-gradients."""
__version__ = "2.0.0"
