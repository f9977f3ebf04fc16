"""paddlefsl.metaopt: gradient-based meta-learning for any Paddle model, exact to second order and beyond."""
from paddlefsl.metaopt.anil import ANIL
from paddlefsl.metaopt.autodiff import exact_ops
from paddlefsl.metaopt.autodiff.released import GraphReleasedError
from paddlefsl.metaopt.base import BaseLearner
from paddlefsl.metaopt.distributed import CollectiveError
from paddlefsl.metaopt.errors import ConvergenceError, SecondOrderError
from paddlefsl.metaopt.functional import ParameterSlots, clone_model, functional_call
from paddlefsl.metaopt.gradcheck import GradCheckReport, check_meta_gradients
from paddlefsl.metaopt.imaml import CGReport, IMAML, conjugate_gradient
from paddlefsl.metaopt.kernels import (fast_kernels_enabled, memory_reuse_applied, memory_reuse_enabled,
                                       set_fast_kernels, set_memory_reuse)
from paddlefsl.metaopt.innerloop import DifferentiableOptimizer, FunctionalModel, innerloop_ctx
from paddlefsl.metaopt.maml import MAML
from paddlefsl.metaopt.meta_sgd import MetaSGD
from paddlefsl.metaopt.optim import OptimizerTwin, register_twin, twin_for
from paddlefsl.metaopt.schedules import multi_step_loss_weights

__all__ = ["ANIL", "BaseLearner", "CGReport", "CollectiveError", "ConvergenceError", "DifferentiableOptimizer",
           "FunctionalModel", "GradCheckReport", "GraphReleasedError", "IMAML", "MAML", "MetaSGD", "OptimizerTwin", "ParameterSlots",
           "SecondOrderError", "check_meta_gradients", "clone_model", "conjugate_gradient", "exact_ops",
           "fast_kernels_enabled", "functional_call", "innerloop_ctx", "memory_reuse_applied", "memory_reuse_enabled",
           "multi_step_loss_weights", "register_twin", "set_fast_kernels", "set_memory_reuse", "twin_for"]
