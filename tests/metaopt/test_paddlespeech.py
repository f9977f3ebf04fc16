"""PaddleSpeech models through MAML and ANIL: second-order meta-gradients equal central finite differences in float64
(at two step sizes), and the first-order answer fails the same check. Needs the `speech` extra; skipped without it."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import nn

from paddlefsl.metaopt import ANIL, MAML, check_meta_gradients

pytestmark = pytest.mark.speech
pytest.importorskip("paddlespeech.kws", reason="PaddleSpeech is not installed (see the `speech` extra)")
from paddlespeech.kws.models.mdtc import MDTC  # noqa: E402
from paddlespeech.vector.models.ecapa_tdnn import EcapaTdnn  # noqa: E402
from paddlespeech.vector.modules.sid_model import SpeakerIdetification  # noqa: E402

MELS, FRAMES, WAYS = 4, 6, 3


class MDTCFeatures(nn.Layer):
    """MDTC takes ``[B, T, mels]`` and returns ``(out [B, T, C], None)``: keep ``out``, average over time."""

    def __init__(self):
        super().__init__()
        self.mdtc = MDTC(stack_num=1, stack_size=2, in_channels=MELS, res_channels=3, kernel_size=3, causal=True)

    def forward(self, x):
        out, _ = self.mdtc(x.transpose([0, 2, 1]))
        return out.mean(axis=1)


class MDTCClassifier(nn.Layer):
    def __init__(self):
        super().__init__()
        self.features, self.head = MDTCFeatures(), nn.Linear(3, WAYS)

    def forward(self, x):
        return self.head(self.features(x))


def ecapa_speaker_id():
    backbone = EcapaTdnn(MELS, lin_neurons=4, channels=[8, 8, 8, 8, 24], attention_channels=4, res2net_scale=2,
                         se_channels=4)
    model = SpeakerIdetification(backbone, num_class=WAYS, dropout=0.1)
    model.to(dtype="float64")  # its cosine classifier's weight is created float32 whatever the default dtype
    return model


def _task(seed=0):
    rng = np.random.default_rng(seed)
    labels = paddle.to_tensor(np.arange(6) % WAYS)
    return (paddle.to_tensor(rng.standard_normal((6, MELS, FRAMES))), labels,
            paddle.to_tensor(rng.standard_normal((6, MELS, FRAMES))), labels)


def _meta_loss(steps, scale):
    def loss_fn(learner, task):
        xs, ys, xq, yq = task
        paddle.seed(7)  # dropout masks: the same in every evaluation
        clone = learner.clone()
        for _ in range(steps):
            clone.adapt(F.cross_entropy(scale * clone(xs), ys))
        return F.cross_entropy(scale * clone(xq), yq)
    return loss_fn


# (model, inner rate, logit scale). SpeakerIdetification returns cosine similarities in [-1, 1]; a scale (as in its
# AM-softmax training) sharpens them. Rates small enough that no ReLU crosses its kink within a finite-difference step.
MODELS = {"mdtc": (MDTCClassifier, 0.5, 1.0), "ecapa_tdnn_speaker_id": (ecapa_speaker_id, 0.1, 5.0)}
# Parameters whose meta-gradient is zero by symmetry (the attentive pooling's bias under the softmax over time) are
# resolved absolutely: atol = 1e-7 against gradients of order 1 to 100.
TOLERANCES = dict(rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", list(MODELS))
def test_maml_meta_gradient_is_exact_and_first_order_is_not(name):
    build, inner_lr, scale = MODELS[name]

    def factory(first_order):
        def make():
            paddle.seed(3)
            model = build()
            assert all(p.dtype == paddle.float64 for p in model.parameters())
            return MAML(model, inner_lr=inner_lr, first_order=first_order)
        return make

    task = _task()
    for eps in (1e-5, 1e-6):
        report = check_meta_gradients(factory(False), _meta_loss(2, scale), task, coordinates=1, eps=eps,
                                      **TOLERANCES)
        assert report.ok, f"eps {eps}\n{report}"
    first = check_meta_gradients(factory(True), _meta_loss(2, scale), task, coordinates=1, eps=1e-6, **TOLERANCES)
    assert not first.ok, f"first order passed\n{first}"


@pytest.mark.parametrize("first_order", [False, True])
def test_anil_on_mdtc_features(first_order):
    def factory():
        paddle.seed(3)
        model = MDTCClassifier()
        return ANIL(model.features, model.head, inner_lr=0.5, first_order=first_order)

    for eps in (1e-5, 1e-6):
        report = check_meta_gradients(factory, _meta_loss(2, 1.0), _task(), coordinates=3, eps=eps, **TOLERANCES)
        assert report.ok != first_order, f"eps {eps}\n{report}"
