"""The exact higher-order op layer: a registry of op rules, one module per op family, and the scope that
installs them while a second-order learner runs. It knows nothing about learners."""
from paddlefsl.metaopt.autodiff import (  # noqa: F401  (each module registers its family's rules)
    activation,
    conv,
    dropout,
    embedding,
    loss,
    norm,
    pool,
    rnn,
    tensor,
)
from paddlefsl.metaopt.autodiff.registry import OpRule, rules
from paddlefsl.metaopt.autodiff.scope import Lease, exact_ops, is_active

__all__ = ["OpRule", "rules", "Lease", "exact_ops", "is_active"]
