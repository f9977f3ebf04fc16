"""PaddleNLP ERNIE through MAML and ANIL: second-order meta-gradients equal central finite differences in float64 (at
two step sizes), and the first-order answer fails the same check. Needs the `nlp` extra; skipped without it."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import nn

from paddlefsl.metaopt import ANIL, MAML, check_meta_gradients

pytestmark = pytest.mark.nlp
pytest.importorskip("paddlenlp", reason="PaddleNLP is not installed (see the `nlp` extra)")
from paddlenlp.transformers import ErnieConfig, ErnieForSequenceClassification, ErnieModel  # noqa: E402

WAYS = 3
TOLERANCES = dict(rtol=1e-5, atol=1e-8)


def _config(dropout):
    return ErnieConfig(vocab_size=11, hidden_size=4, num_hidden_layers=1, num_attention_heads=2, intermediate_size=6,
                       max_position_embeddings=8, type_vocab_size=2, num_labels=WAYS, hidden_dropout_prob=dropout,
                       attention_probs_dropout_prob=dropout)


class ErnieFeatures(nn.Layer):
    """ErnieModel returns a tuple ``(sequence, pooled)``; the features are the pooled [CLS] state."""

    def __init__(self):
        super().__init__()
        self.ernie = ErnieModel(_config(0.1))

    def forward(self, ids):
        _, pooled = self.ernie(ids)
        return pooled


def _task(seed=0):
    rng = np.random.default_rng(seed)
    labels = paddle.to_tensor(np.arange(6) % WAYS)

    def ids():
        out = rng.integers(1, 11, (6, 5))
        out[::2, 3:] = 0  # padding, which ErnieModel masks out (pad_token_id 0)
        return paddle.to_tensor(out)
    return ids(), labels, ids(), labels


def _meta_loss(learner, task):
    xs, ys, xq, yq = task
    paddle.seed(7)  # dropout masks: the same in every evaluation
    clone = learner.clone()
    for _ in range(2):
        clone.adapt(F.cross_entropy(clone(xs), ys))
    return F.cross_entropy(clone(xq), yq)


def _check_both_step_sizes(factory, coordinates):
    for eps in (1e-5, 1e-6):
        report = check_meta_gradients(factory, _meta_loss, _task(), coordinates=coordinates, eps=eps, **TOLERANCES)
        yield eps, report


@pytest.mark.parametrize("first_order", [False, True])
def test_maml_on_ernie_for_sequence_classification(first_order):
    def factory():
        paddle.seed(3)
        model = ErnieForSequenceClassification(_config(0.1))
        assert all(p.dtype == paddle.float64 for p in model.parameters())
        return MAML(model, inner_lr=0.5, first_order=first_order)

    for eps, report in _check_both_step_sizes(factory, coordinates=1):
        assert report.ok != first_order, f"eps {eps}, first_order {first_order}\n{report}"


@pytest.mark.parametrize("first_order", [False, True])
def test_anil_on_ernie_model_features_and_a_linear_head(first_order):
    def factory():
        paddle.seed(3)
        return ANIL(ErnieFeatures(), nn.Linear(4, WAYS), inner_lr=0.5, first_order=first_order)

    for eps, report in _check_both_step_sizes(factory, coordinates=2):
        assert report.ok != first_order, f"eps {eps}, first_order {first_order}\n{report}"


@pytest.mark.parametrize("first_order", [False, True])
def test_unchanged_ernie_adapts_a_batch_of_tasks_as_separate_clones(first_order):
    """clone(tasks=3) on ErnieForSequenceClassification (embeddings, layer norms, attention's linear layers): the
    meta-gradient equals the loop of one clone per task (no dropout, so both see the same function)."""
    paddle.seed(3)
    learner = MAML(ErnieForSequenceClassification(_config(0.0)), inner_lr=0.5, first_order=first_order)
    tasks = [_task(seed) for seed in range(3)]
    xs, ys, xq, yq = (paddle.stack([task[i] for task in tasks]) for i in range(4))
    params = [p for p in learner.parameters() if not p.stop_gradient]
    batched = learner.clone(tasks=3)
    for _ in range(2):
        batched.adapt(F.cross_entropy(batched(xs), ys, reduction="none").mean(axis=1))
    got = paddle.grad(F.cross_entropy(batched(xq), yq), params)
    losses = []
    for x_s, y_s, x_q, y_q in tasks:
        clone = learner.clone()
        for _ in range(2):
            clone.adapt(F.cross_entropy(clone(x_s), y_s))
        losses.append(F.cross_entropy(clone(x_q), y_q))
    want = paddle.grad(paddle.stack(losses).mean(), params)
    scale = max(float(w.abs().max()) for w in want)
    assert scale > 0
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=0, atol=1e-10 * scale)
