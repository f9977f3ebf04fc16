"""Omniglot N-way K-shot with MAML, first-order MAML or ANIL on the MAML paper's Conv4 (64 channels, strided).

    python examples/omniglot.py --data-root data/omniglot --out runs/omniglot-maml-1shot \\
        --algorithm maml --split minimal --ways 5 --shots 1 --iterations 2000

Writes OUT/metrics.jsonl, OUT/learning_curve.png, OUT/checkpoint.pkl (plain model keys; --resume continues from it)
and OUT/results.json (test accuracy with its 95% confidence interval over --eval-tasks tasks and, with all_runs.zip
in the data root, the error rate on Lake et al.'s 20 one-shot runs). Runs unchanged on several processes:
``python -m paddle.distributed.launch --nproc_per_node 2 examples/omniglot.py ...``, or
``paddle.distributed.spawn(omniglot.main, args=(argv,), nprocs=2)`` (docs/distributed.md).
"""
from __future__ import annotations

import os
import sys

import numpy as np
import paddle
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from episodic import check_args, parser, run  # noqa: E402
from lake import head_predictor, lake_steps, nearest_predictor, wide_head_learner  # noqa: E402

from paddlefsl.backbones import Conv4  # noqa: E402
from paddlefsl.datasets import (CorruptDatasetError, DatasetNotFoundError, DownloadError, Omniglot,  # noqa: E402
                                OmniglotOneShotRuns)


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (default: the command line), meta-train and evaluate; returns the results dict."""
    p = parser(__doc__.splitlines()[0], dict(query=5, iterations=2000, meta_batch=32, inner_steps=1,
                                              test_inner_steps=3, inner_lr=0.4))
    p.add_argument("--download", action="store_true",
                   help="fetch the split's missing zips and Lake's all_runs.zip into --data-root (created if "
                        "missing) from the official GitHub repository, checksummed")
    args = p.parse_args(argv)
    check_args(p, args)

    try:
        train = Omniglot(args.data_root, split=args.split, mode="train", download=args.download)
        test = Omniglot(args.data_root, split=args.split, mode="test", download=args.download)
        if args.download:
            OmniglotOneShotRuns(args.data_root, download=True)  # scored at the end, see lake_runs
    except DatasetNotFoundError as err:
        p.exit(1, f"{p.prog}: error: {err} With this script: add --download.\n")
    except (DownloadError, CorruptDatasetError) as err:
        p.exit(1, f"{p.prog}: error: {err}\n")
    paddle.seed(args.seed)
    model = Conv4.omniglot(args.ways)

    def lake_runs(meta_learner) -> dict:
        """Lake et al.'s 20-way one-shot runs, two ways: a 20-way head started from the mean of the meta-learned
        rows and adapted on the 20 training images (see examples/lake.py), and the cosine nearest neighbour of the
        features."""
        if not os.path.exists(os.path.join(args.data_root, "all_runs.zip")):
            return {}
        runs = OmniglotOneShotRuns(args.data_root)
        predictors = {"lake_20way_one_shot_error": head_predictor(wide_head_learner(args, meta_learner),
                                                                  lake_steps(args)),
                      "lake_20way_one_shot_error_nearest": nearest_predictor(meta_learner)}
        with tqdm(total=len(predictors) * len(runs), desc="Lake's runs", leave=False, dynamic_ncols=True) as bar:
            def counted(predict):
                def predict_and_count(support, query):
                    try:
                        return predict(support, query)
                    finally:
                        bar.update()
                return predict_and_count
            return {key: float(np.round(runs.evaluate_one_shot_runs(counted(predict)), 4))
                    for key, predict in predictors.items()}

    return run(args, model, train, test, extra_eval=lake_runs)


if __name__ == "__main__":
    main()
