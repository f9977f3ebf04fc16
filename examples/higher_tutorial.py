"""The ``higher`` tutorial (meta-learning the learning rate and momentum of a 1-D regression), in Paddle.

A linear model ``y = w x`` is fit to ``y = 3.5 x`` by 5 steps of Momentum (lr 0.3, momentum 0.5) inside
`paddlefsl.metaopt.innerloop_ctx`, with the learning rate and momentum given as tensors. The meta-loss
``(w_5 - 3.5)^2`` is then differentiated w.r.t. the learning rate, the momentum and the initial weight. The numbers
printed are those of PyTorch ``higher``'s tutorial:

    meta-loss 0.011927987982895832
    d/d lr -1.6294974   d/d momentum -0.9496140   d/d w0 -0.0053113925
    weights -0.99147 -0.12170 1.01453 2.06395 2.86676 3.39078

Run: ``python examples/higher_tutorial.py``.
"""
from __future__ import annotations

import numpy as np
import paddle
import paddle.nn.functional as F
from paddle import nn

from paddlefsl.metaopt.innerloop import innerloop_ctx

INITIAL_WEIGHT = -0.9914729595184326


def run_tutorial(steps: int = 5) -> dict:
    """Run the tutorial and return the meta-loss, the weight history and the three meta-gradients."""
    np.random.seed(1)
    x_np = np.random.random((100, 1))            # float64, as in the tutorial
    y_np = 3.5 * x_np
    x, y = paddle.to_tensor(x_np), paddle.to_tensor(y_np)

    model = nn.Linear(1, 1, bias_attr=False)
    model.to(dtype="float64")                    # the data is float64, so is the model
    model.weight.set_value(np.array([[INITIAL_WEIGHT]]))
    optimizer = paddle.optimizer.Momentum(learning_rate=0.3, momentum=0.5, parameters=model.parameters())

    lr = paddle.to_tensor(np.float32(0.3), stop_gradient=False)          # float32 tensors, cast in the update
    momentum = paddle.to_tensor(np.float32(0.5), stop_gradient=False)

    with innerloop_ctx(model, optimizer, copy_initial_weights=False,
                       override={"lr": lr, "momentum": momentum}) as (fmodel, diffopt):
        for _ in range(steps):
            diffopt.step(F.mse_loss(fmodel(x), y))
        final_weight = fmodel.parameters()[0]
        meta_loss = ((final_weight - 3.5) ** 2).sum()
        meta_loss.backward()
        history = [float(fmodel.parameters(time=t)[0].item()) for t in range(steps + 1)]

    return {"meta_loss": float(meta_loss.item()), "weights": history, "grad_lr": float(lr.grad.item()),
            "grad_momentum": float(momentum.grad.item()), "grad_w0": float(model.weight.grad.item())}


def main() -> None:
    result = run_tutorial()
    print(f"meta-loss        {result['meta_loss']!r}")
    print(f"d/d lr           {result['grad_lr']:.7f}")
    print(f"d/d momentum     {result['grad_momentum']:.7f}")
    print(f"d/d w0           {result['grad_w0']:.10f}")
    print("weights          " + " ".join(f"{w:.5f}" for w in result["weights"]))


if __name__ == "__main__":
    main()
