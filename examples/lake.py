"""Lake et al.'s 20-way one-shot protocol for a meta-learned Omniglot network, shared by examples/omniglot.py and
examples/omniglot_lake_steps.py."""
from __future__ import annotations

import argparse
from typing import Callable

import numpy as np
import paddle
import paddle.nn.functional as F
from episodic import adapt_and_predict, make_learner

from paddlefsl.backbones import Conv4
from paddlefsl.metaopt import BaseLearner

LAKE_STEPS = 20  # chosen among 3, 10, 20 and 40 by examples/omniglot_lake_steps.py, never on Lake's runs

Predictor = Callable[[np.ndarray, np.ndarray], np.ndarray]


def wide_head_learner(args: argparse.Namespace, meta_learner: BaseLearner, ways: int = 20) -> BaseLearner:
    """A learner (``--algorithm``, with the meta-learner's inner rates) around a copy of the meta-learned network
    whose ``ways``-way head has every row start as the mean of the meta-learned head's rows, so no class is favoured.
    """
    meta_model = meta_learner.model
    wide = Conv4.omniglot(ways)
    wide.features.set_state_dict(meta_model.features.state_dict())
    with paddle.no_grad():
        for wide_p, meta_p in zip(wide.head.parameters(), meta_model.head.parameters()):
            row = meta_p.mean(axis=-1, keepdim=True)  # the head's last axis indexes the classes
            paddle.assign(row.expand(wide_p.shape), output=wide_p)
    learner = make_learner(args, wide)
    if args.learn_inner_lr:
        learner.inner_lrs.set_state_dict(meta_learner.inner_lrs.state_dict())
    return learner


def head_predictor(learner: BaseLearner, steps: int) -> Predictor:
    """``predict(support, query)``: adapt a clone ``steps`` first-order times on the support images (one per class,
    class ``i`` at row ``i``) and return the most likely support index of every query image."""
    def predict(support: np.ndarray, query: np.ndarray) -> np.ndarray:
        _, logits = adapt_and_predict(learner, paddle.to_tensor(support), paddle.arange(len(support)),
                                      paddle.to_tensor(query), steps, first_order=True)
        return logits.argmax(axis=1).numpy()
    return predict


def nearest_predictor(meta_learner: BaseLearner) -> Predictor:
    """``predict(support, query)``: the support image nearest to each query image by cosine similarity of the
    meta-learned features (no adaptation)."""
    def predict(support: np.ndarray, query: np.ndarray) -> np.ndarray:
        with paddle.no_grad():
            fs = F.normalize(meta_learner.model.features(paddle.to_tensor(support)), axis=1)
            fq = F.normalize(meta_learner.model.features(paddle.to_tensor(query)), axis=1)
        return paddle.matmul(fq, fs, transpose_y=True).argmax(axis=1).numpy()
    return predict


def lake_steps(args: argparse.Namespace) -> int:
    """LAKE_STEPS, or ``--inner-steps`` where per-step learned rates exist for that many steps only."""
    return args.inner_steps if args.learn_inner_lr == "per_step_per_layer" else LAKE_STEPS
