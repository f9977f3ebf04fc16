import numpy as np
import pytest

from paddlefsl.augment import RandomShift


def _offset(source: np.ndarray, shifted: np.ndarray, max_shift: int) -> tuple:
    """The (dy, dx) whose zero-filled translation of ``source`` equals ``shifted``; fails if none does."""
    height, width = source.shape[-2:]
    padded = np.pad(source, [(0, 0)] * (source.ndim - 2) + [(max_shift, max_shift)] * 2)
    matches = [(dy, dx) for dy in range(-max_shift, max_shift + 1) for dx in range(-max_shift, max_shift + 1)
               if np.array_equal(padded[..., max_shift - dy:max_shift - dy + height,
                                        max_shift - dx:max_shift - dx + width], shifted)]
    assert len(matches) == 1, matches
    return matches[0]


@pytest.mark.parametrize("shape", [(6, 1, 9, 9), (6, 3, 8, 10), (6, 9, 9)])
def test_each_image_is_a_zero_filled_translation_within_the_bound(shape):
    images = np.random.default_rng(0).uniform(0.5, 1.0, size=shape).astype(np.float32)
    before = images.copy()
    out = RandomShift(2, seed=3)(images)
    np.testing.assert_array_equal(images, before)
    offsets = [_offset(a, b, 2) for a, b in zip(images, out)]
    assert all(max(abs(dy), abs(dx)) <= 2 for dy, dx in offsets)
    assert len(set(offsets)) > 1 and out.dtype == images.dtype and out.shape == images.shape


def test_zero_shift_is_the_identity():
    images = np.random.default_rng(0).normal(size=(4, 1, 5, 5))
    np.testing.assert_array_equal(RandomShift(0, seed=0)(images), images)


def test_same_seed_same_offsets_and_state_round_trip():
    images = np.random.default_rng(1).uniform(0.5, 1.0, size=(8, 1, 7, 7))
    a, b = RandomShift(3, seed=5), RandomShift(3, seed=5)
    np.testing.assert_array_equal(a(images), b(images))
    state = a.get_state()
    first = a(images)
    assert not np.array_equal(first, a(images))
    b.set_state(state)
    np.testing.assert_array_equal(b(images), first)


@pytest.mark.parametrize("max_shift", [0, 2])
def test_skip_advances_the_stream_as_a_call_on_that_many_images(max_shift):
    images = np.random.default_rng(1).uniform(0.5, 1.0, size=(5, 1, 7, 7))
    a, b = RandomShift(max_shift, seed=5), RandomShift(max_shift, seed=5)
    a(images[:3])
    a(images[3:])
    b.skip(3)
    b.skip(2)
    assert a.get_state() == b.get_state()
    np.testing.assert_array_equal(a(images), b(images))
    with pytest.raises(ValueError, match="count must be >= 0"):
        b.skip(-1)


@pytest.mark.parametrize("max_shift, error, message", [
    (-1, ValueError, "max_shift must be >= 0"),
    (1.5, TypeError, "max_shift must be an integer"),
    (True, TypeError, "max_shift must be an integer"),
])
def test_bad_max_shift(max_shift, error, message):
    with pytest.raises(error, match=message):
        RandomShift(max_shift)


@pytest.mark.parametrize("images, message", [
    (np.zeros((2, 4, 4)).tolist(), "numpy array"),
    (np.zeros((4, 4)), "numpy array"),
    (np.zeros((2, 1, 4, 3)), "smaller than the image size 4x3"),
])
def test_bad_images(images, message):
    with pytest.raises(ValueError, match=message):
        RandomShift(3)(images)
