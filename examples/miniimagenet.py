"""miniImageNet N-way K-shot with MAML, first-order MAML or ANIL on the MAML paper's Conv4 (32 channels, max-pool).

Needs the Ravi & Larochelle split in --data-root: {train,val,test}.csv with an images/ folder, or the
mini-imagenet-cache-{train,val,test}.pkl files. The MAML paper's settings are the defaults:

    python examples/miniimagenet.py --data-root DATA/miniimagenet --out runs/mini-maml-1shot --shots 1
    python examples/miniimagenet.py --data-root DATA/miniimagenet --out runs/mini-maml-5shot --shots 5 --meta-batch 2

(5-way, 15 query images per class, 5 inner steps at lr 0.01, 10 at test, 60000 iterations). Outputs as in
examples/omniglot.py; runs unchanged under ``python -m paddle.distributed.launch --nproc_per_node N`` or
``paddle.distributed.spawn(miniimagenet.main, args=(argv,), nprocs=N)`` (docs/distributed.md).
"""
from __future__ import annotations

import os
import sys

import paddle

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from episodic import check_args, parser, run  # noqa: E402

from paddlefsl.backbones import Conv4  # noqa: E402
from paddlefsl.datasets import CorruptDatasetError, DatasetNotFoundError, MiniImageNet  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (default: the command line), meta-train and evaluate; returns the results dict."""
    p = parser(__doc__.splitlines()[0], dict(query=15, iterations=60000, meta_batch=4, inner_steps=5,
                                              test_inner_steps=10, inner_lr=0.01))
    args = p.parse_args(argv)
    check_args(p, args)
    if args.split != "minimal":
        p.error("--split applies to Omniglot only; miniImageNet always uses the Ravi & Larochelle split")

    try:
        train = MiniImageNet(args.data_root, mode="train")
        test = MiniImageNet(args.data_root, mode="test")
    except (DatasetNotFoundError, CorruptDatasetError) as err:
        p.exit(1, f"{p.prog}: error: {err}\n")
    paddle.seed(args.seed)
    model = Conv4.miniimagenet(args.ways)
    return run(args, model, train, test)


if __name__ == "__main__":
    main()
