"""Differentiable twins of Paddle's optimizers: functional ``init`` / ``update`` pairs and their registry."""
from paddlefsl.metaopt.optim.adadelta import AdadeltaTwin
from paddlefsl.metaopt.optim.adagrad import AdagradTwin
from paddlefsl.metaopt.optim.adam import AdamTwin
from paddlefsl.metaopt.optim.adamw import AdamWTwin
from paddlefsl.metaopt.optim.base import OptimizerTwin, register_twin, registered_twins, safe_sqrt, twin_for
from paddlefsl.metaopt.optim.momentum import MomentumTwin
from paddlefsl.metaopt.optim.rmsprop import RMSPropTwin
from paddlefsl.metaopt.optim.sgd import SGDTwin

for _twin in (SGDTwin, MomentumTwin, AdamTwin, AdamWTwin, RMSPropTwin, AdagradTwin, AdadeltaTwin):
    register_twin(_twin.paddle_type, _twin)
del _twin

__all__ = ["OptimizerTwin", "register_twin", "registered_twins", "twin_for", "safe_sqrt", "SGDTwin", "MomentumTwin",
           "AdamTwin", "AdamWTwin", "RMSPropTwin", "AdagradTwin", "AdadeltaTwin"]
