"""Tests for paddlefsl.backbones: shapes, parameter counts, features/head split, BN modes."""
import numpy as np
import paddle
import pytest
from paddle import nn

from paddlefsl.backbones import MLP, Conv4, ResNet12


def _count(layer):
    return sum(int(np.prod(p.shape)) for p in layer.parameters() if not p.stop_gradient)


@pytest.mark.parametrize("ways", [2, 5])
@pytest.mark.parametrize("image_size", [28, 20])
def test_conv4_omniglot(ways, image_size):
    paddle.seed(0)
    net = Conv4.omniglot(ways, image_size=image_size)
    x = paddle.randn([3, 1, image_size, image_size])
    feats = net.features(x)
    assert feats.shape == [3, 64] and net.feature_dim == 64
    assert net(x).shape == [3, ways]
    np.testing.assert_allclose(net.head(feats).numpy(), net(x).numpy(), rtol=1e-6)
    convs = [m for m in net.features.sublayers() if isinstance(m, nn.Conv2D)]
    assert len(convs) == 4 and all(c._stride == [2, 2] and c._padding == 1 for c in convs)
    assert not any(isinstance(m, nn.MaxPool2D) for m in net.sublayers())
    assert sum(isinstance(m, nn.BatchNorm2D) for m in net.sublayers()) == 4
    # conv: (1*9+1)*64 + 3*(64*9+1)*64, BN: 4*2*64, head: 64*ways+ways
    assert _count(net) == 10 * 64 + 3 * (64 * 9 + 1) * 64 + 4 * 128 + 65 * ways


@pytest.mark.parametrize("image_size,flat", [(84, 32 * 5 * 5), (32, 32 * 2 * 2)])
def test_conv4_miniimagenet(image_size, flat):
    net = Conv4.miniimagenet(5, image_size=image_size)
    assert net.feature_dim == flat
    x = paddle.randn([2, 3, image_size, image_size])
    assert net.features(x).shape == [2, flat]
    assert net(x).shape == [2, 5]
    assert sum(isinstance(m, nn.MaxPool2D) for m in net.sublayers()) == 4
    assert all(m._out_channels == 32 for m in net.sublayers() if isinstance(m, nn.Conv2D))
    assert net.head.weight.shape == [flat, 5]


def test_conv4_errors():
    with pytest.raises(ValueError, match="variant"):
        Conv4(5, variant="cifar")
    with pytest.raises(ValueError, match="too small"):
        Conv4.miniimagenet(5, image_size=8)


@pytest.mark.parametrize("transductive", [False, True])
def test_conv4_batchnorm_modes(transductive):
    paddle.seed(1)
    net = Conv4.omniglot(3, transductive_bn=transductive)
    x = paddle.randn([4, 1, 28, 28]) * 3 + 2
    net.train()
    train_out = net(x).numpy()
    net.eval()
    eval_out = net(x).numpy()
    assert np.allclose(train_out, eval_out, atol=1e-5) == transductive


@pytest.mark.parametrize("sizes,activation", [([4, 3], "relu"), ([4, 8, 3], "tanh"), ([4, 8, 8, 2], nn.ELU)])
def test_mlp(sizes, activation):
    net = MLP(sizes, activation)
    x = paddle.randn([5, sizes[0]])
    assert net(x).shape == [5, sizes[-1]]
    assert net.features(x).shape == [5, sizes[-2]]
    linears = [m for m in net.sublayers() if isinstance(m, nn.Linear)]
    assert len(linears) == len(sizes) - 1
    assert _count(net) == sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))


def test_mlp_activation_and_errors():
    net = MLP([2, 3, 1], "relu")
    with paddle.no_grad():
        net.features[0].weight.set_value(-paddle.ones([2, 3]))
        net.features[0].bias.set_value(paddle.zeros([3]))
    assert float(net.features(paddle.ones([1, 2])).abs().sum()) == 0.0  # ReLU clamps negatives
    with pytest.raises(ValueError, match="unknown activation"):
        MLP([2, 2], "swish9")
    with pytest.raises(ValueError, match="at least two"):
        MLP([3])


@pytest.mark.parametrize("ways", [None, 4])
@pytest.mark.parametrize("size", [16, 20])
def test_resnet12_small(ways, size):
    paddle.seed(0)
    net = ResNet12(ways=ways, in_channels=3, channels=(4, 5, 6, 7))
    x = paddle.randn([2, 3, size, size])
    out = net(x)
    assert net.features(x).shape == [2, 7]
    assert out.shape == [2, 7 if ways is None else ways]
    assert (net.head is None) == (ways is None)
    loss = out.sum()
    loss.backward()
    assert all(p.grad is not None for p in net.parameters() if not p.stop_gradient)


def test_resnet12_default_widths():
    net = ResNet12(ways=5)
    blocks = list(net.features.children())[:4]
    assert [b.conv1._out_channels for b in blocks] == [64, 160, 320, 640]
    assert net.feature_dim == 640 and net.head.weight.shape == [640, 5]
    with pytest.raises(ValueError):
        ResNet12(channels=(8, 8))
