"""Composite models through MAML and ANIL: second-order meta-gradients vs finite differences, first order fails."""
import numpy as np
import paddle
import paddle.nn.functional as F
import pytest
from paddle import nn

from paddlefsl.backbones import Conv4, ResNet12Block
from paddlefsl.metaopt import ANIL, MAML, check_meta_gradients


class Conv4BNMaxPool(nn.Layer):
    def __init__(self):
        super().__init__()
        blocks = []
        for c_in in (1, 3):
            blocks += [nn.Conv2D(c_in, 3, 3, padding=1), nn.BatchNorm2D(3), nn.ReLU(), nn.MaxPool2D(2)]
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.head = nn.Linear(3 * 2 * 2, 3)

    def forward(self, x):
        return self.head(self.features(x))


class StridedConv(nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2D(1, 3, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2D(3, 3, 3, stride=2, padding="SAME", groups=3)
        self.pool = nn.AdaptiveAvgPool2D(1)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        h = F.elu(self.conv2(F.leaky_relu(self.conv1(x), 0.1)))
        return self.head(self.pool(h).flatten(1))


class ResBlockNet(nn.Layer):
    def __init__(self):
        super().__init__()
        self.block = ResNet12Block(1, 3)
        self.head = nn.Linear(3, 3)

    def forward(self, x):
        return self.head(self.block(x).mean(axis=[2, 3]))


class GeluLayerNormMLP(nn.Layer):
    def __init__(self):
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(4, 6), nn.LayerNorm(6), nn.Linear(6, 3)

    def forward(self, x):
        return self.fc2(F.gelu(self.norm(self.fc1(x))))


class TransformerClassifier(nn.Layer):
    def __init__(self, pre_norm):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.position = self.create_parameter([5, 4])
        layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.1, normalize_before=pre_norm)
        self.encoder = nn.TransformerEncoder(layer, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        mask = (ids != 0).astype("float64").unsqueeze([1, 2]) * 1e4 - 1e4
        h = self.encoder(self.embed(ids) + self.position, src_mask=mask)
        return self.head(h.mean(axis=1))


class LSTMText(nn.Layer):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 3, padding_idx=0)
        self.lstm = nn.LSTM(3, 4, direction="bidirect")
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        out, _ = self.lstm(self.embed(ids), sequence_length=(ids != 0).astype("int64").sum(axis=1))
        return self.head(out[:, 0])


class Conv1DGRUSpeech(nn.Layer):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1D(2, 3, 3, padding=1)
        self.gru = nn.GRU(3, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.conv(x)).transpose([0, 2, 1])
        _, state = self.gru(h)
        return self.head(state[0])


class TiedEmbeddings(nn.Layer):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, ids):
        h = paddle.tanh(self.mix(self.embed(ids).mean(axis=1)))
        return paddle.matmul(h, self.embed.weight, transpose_y=True)[:, :3]


def _images(shape):
    def make(rng):
        return paddle.to_tensor(rng.standard_normal(shape))
    return make


def _ids(rng):
    ids = rng.integers(1, 7, (6, 5))
    ids[::2, 3:] = 0
    return paddle.to_tensor(ids)


CASES = {
    "conv4_bn_maxpool": (Conv4BNMaxPool, _images((6, 1, 8, 8))),
    "strided_conv": (StridedConv, _images((6, 1, 8, 8))),
    "resnet12_block": (ResBlockNet, _images((6, 1, 6, 6))),
    "gelu_layernorm_mlp": (GeluLayerNormMLP, _images((6, 4))),
    "transformer_post_norm": (lambda: TransformerClassifier(False), _ids),
    "transformer_pre_norm": (lambda: TransformerClassifier(True), _ids),
    "lstm_text": (LSTMText, _ids),
    "conv1d_gru_speech": (Conv1DGRUSpeech, _images((6, 2, 7))),
    "tied_embeddings": (TiedEmbeddings, _ids),
}


def _task(make_input, seed=0):
    rng = np.random.default_rng(seed)
    labels = paddle.to_tensor(np.arange(6) % 3)
    return make_input(rng), labels, make_input(rng), labels


def _meta_loss(steps):
    def loss_fn(learner, task):
        xs, ys, xq, yq = task
        paddle.seed(7)  # dropout masks: the same in every evaluation
        clone = learner.clone()
        for _ in range(steps):
            clone.adapt(F.cross_entropy(clone(xs), ys))
        return F.cross_entropy(clone(xq), yq)
    return loss_fn


def _maml(build, first_order=False):
    def factory():
        paddle.seed(3)
        return MAML(build(), inner_lr=0.5, first_order=first_order)
    return factory


@pytest.mark.parametrize("name", list(CASES))
def test_maml_meta_gradient_is_exact(name):
    build, make_input = CASES[name]
    task = _task(make_input)
    report = check_meta_gradients(_maml(build), _meta_loss(2), task, coordinates=2, eps=1e-5, rtol=1e-5)
    assert report.ok, str(report)
    first = check_meta_gradients(_maml(build, True), _meta_loss(2), task, coordinates=2, eps=1e-5, rtol=1e-5)
    assert not first.ok


def test_maml_three_steps_on_conv4_with_bn_and_maxpool():
    report = check_meta_gradients(_maml(Conv4BNMaxPool), _meta_loss(3), _task(CASES["conv4_bn_maxpool"][1]),
                                  coordinates=3, eps=1e-5, rtol=1e-5)
    assert report.ok, str(report)


@pytest.mark.parametrize("first_order", [False, True])
def test_anil_conv_net(first_order):
    def factory():
        paddle.seed(3)
        model = Conv4(ways=3, in_channels=1, hidden=4, image_size=8)
        return ANIL(model.features, model.head, inner_lr=0.5, first_order=first_order)

    report = check_meta_gradients(factory, _meta_loss(2), _task(_images((6, 1, 8, 8))), coordinates=3, eps=1e-5,
                                  rtol=1e-5)
    assert report.ok != first_order, str(report)
