"""Errors raised by paddlefsl.metaopt."""
from __future__ import annotations


class SecondOrderError(RuntimeError):
    """An op was about to be differentiated twice without an exact higher-order gradient.

    Raised instead of returning a meta-gradient that would be silently wrong.

    Attributes:
        op: the Paddle kernel's name (``paddle._C_ops.<op>``).
        layer: the path of the layer that called it, e.g. ``"features.2 (Conv3D)"``, or ``"<outside the model>"``.
    """

    def __init__(self, op: str, layer: str, reason: str = "has no exact higher-order gradient in paddlefsl"):
        self.op = op
        self.layer = layer
        super().__init__(
            f"op '{op}' called in layer {layer} {reason}; its meta-gradient would be wrong. "
            "Use first_order=True for this model (track_higher_grads=False in innerloop_ctx), or register an exact rule for the op "
            "(paddlefsl.metaopt.autodiff.registry.exact)."
        )


class ConvergenceError(RuntimeError):
    """An iterative solver stopped before reaching its tolerance; its answer is not returned.

    Attributes:
        solver: what was being solved, e.g. ``"conjugate gradient (iMAML meta-gradient)"``.
        iterations: the iterations it ran.
        residual: the relative residual it reached (``|b - A x| / |b|``).
        tolerance: the relative residual it needed.
    """

    def __init__(self, solver: str, iterations: int, residual: float, tolerance: float, advice: str = ""):
        self.solver = solver
        self.iterations = iterations
        self.residual = residual
        self.tolerance = tolerance
        super().__init__(f"{solver} did not converge: relative residual {residual:.3g} after {iterations} "
                         f"iterations, tolerance {tolerance:.3g}" + (f"; {advice}" if advice else ""))
