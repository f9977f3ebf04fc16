"""Omniglot N-way K-shot with MAML, first-order MAML or ANIL on the MAML paper's Conv4 (64 channels, strided).

    python examples/omniglot.py --data-root ../shared/data/omniglot --out runs/omniglot-maml-1shot \\
        --algorithm maml --split minimal --ways 5 --shots 1 --iterations 2000

Writes OUT/metrics.jsonl, OUT/learning_curve.png, OUT/checkpoint.pkl (plain model keys; --resume continues from it)
and OUT/results.json (test accuracy with its 95% confidence interval over --eval-tasks tasks and, with all_runs.zip
in the data root, the error rate on Lake et al.'s 20 one-shot runs).
"""
import os
import sys

import numpy as np
import paddle
import paddle.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from episodic import check_args, make_learner, parser, run  # noqa: E402

from paddlefsl.backbones import Conv4  # noqa: E402
from paddlefsl.datasets import Omniglot, OmniglotOneShotRuns  # noqa: E402

p = parser(__doc__.splitlines()[0], dict(query=5, iterations=2000, meta_batch=32, inner_steps=1,
                                          test_inner_steps=3, inner_lr=0.4))
p.add_argument("--download", action="store_true", help="fetch missing zips from the official source")
args = p.parse_args()
check_args(p, args)

train = Omniglot(args.data_root, split=args.split, mode="train", download=args.download)
test = Omniglot(args.data_root, split=args.split, mode="test", download=args.download)
paddle.seed(args.seed)
model = Conv4.omniglot(args.ways)


LAKE_STEPS = 20  # chosen among 3, 10, 20 and 40 on 20-way tasks from the meta-train characters, not on Lake's runs


def lake_runs(meta_learner) -> dict:
    """Lake et al.'s 20-way one-shot runs, two ways. First, the meta-learned network with a 20-way head whose every
    row starts as the mean of the meta-learned head's rows (so no class is favoured), adapted on the 20 training
    images LAKE_STEPS times (first order, with the meta-learner's inner rates), then used on the 20 test images.
    Second, the nearest training image by cosine similarity of the meta-learned features (no adaptation)."""
    if not os.path.exists(os.path.join(args.data_root, "all_runs.zip")):
        return {}
    runs = OmniglotOneShotRuns(args.data_root)
    meta_model = meta_learner.model
    wide = Conv4.omniglot(20)
    wide.features.set_state_dict(meta_model.features.state_dict())
    with paddle.no_grad():
        for wide_p, meta_p in zip(wide.head.parameters(), meta_model.head.parameters()):
            row = meta_p.mean(axis=-1, keepdim=True)  # the head's last axis indexes the classes
            paddle.assign(row.expand(wide_p.shape), output=wide_p)
    learner = make_learner(args, wide)
    if args.learn_inner_lr:
        learner.inner_lrs.set_state_dict(meta_learner.inner_lrs.state_dict())
    steps = args.inner_steps if args.learn_inner_lr == "per_step_per_layer" else LAKE_STEPS  # rates exist per step

    def predict(support, query):
        task = learner.clone()
        ys = paddle.arange(20)
        for _ in range(steps):
            task.adapt(F.cross_entropy(task(paddle.to_tensor(support)), ys), first_order=True)
        return task(paddle.to_tensor(query)).argmax(axis=1).numpy()

    def nearest(support, query):
        with paddle.no_grad():
            fs = F.normalize(meta_model.features(paddle.to_tensor(support)), axis=1)
            fq = F.normalize(meta_model.features(paddle.to_tensor(query)), axis=1)
        return paddle.matmul(fq, fs, transpose_y=True).argmax(axis=1).numpy()

    return {"lake_20way_one_shot_error": float(np.round(runs.evaluate_one_shot_runs(predict), 4)),
            "lake_20way_one_shot_error_nearest": float(np.round(runs.evaluate_one_shot_runs(nearest), 4))}


run(args, model, train, test, extra_eval=lake_runs)
