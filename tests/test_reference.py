"""The shared float64 reference itself, against a plain numpy loop over kernel offsets (no scipy)."""

from __future__ import annotations

import numpy as np
import pytest
from reference import assert_close, reference


def loop_reference(image: np.ndarray, kernels: np.ndarray) -> np.ndarray:
    """Valid correlation of image (H, W, C) with kernels (K, kh, kw, C), one kernel offset at a time."""
    k, kh, kw, _ = kernels.shape
    oh, ow = image.shape[0] - kh + 1, image.shape[1] - kw + 1
    out = np.zeros((k, oh, ow))
    for a in range(kh):
        for b in range(kw):
            out += np.einsum("kc,hwc->khw", kernels[:, a, b, :], image[a : a + oh, b : b + ow, :])
    return out


@pytest.mark.parametrize(("image_shape", "kernels_shape"),
                         [((9, 7, 1), (3, 3, 3, 1)), ((6, 11, 3), (2, 4, 2, 3)), ((5, 5, 2), (1, 5, 5, 2))])
def test_the_reference_is_a_valid_correlation_summed_over_channels(rng, image_shape, kernels_shape) -> None:
    image = rng.standard_normal(image_shape)
    kernels = rng.standard_normal(kernels_shape)
    np.testing.assert_allclose(reference(image, kernels), loop_reference(image, kernels), rtol=0, atol=1e-12)
    # convolution is correlation with the kernels flipped; 2-D and 3-D inputs are one channel
    flipped = reference(image, kernels[:, ::-1, ::-1, :], flip=True)
    np.testing.assert_allclose(flipped, loop_reference(image, kernels), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(reference(image[:, :, 0], kernels[..., 0]),
                                  reference(image[:, :, :1], kernels[..., :1]))


def test_assert_close_holds_each_dtype_to_its_bar() -> None:
    expected = np.full((1, 2, 2), 100.0)
    assert_close(expected.astype(np.float32) + np.float32(1e-4), expected)
    with pytest.raises(AssertionError, match="max error"):
        assert_close((expected + 1e-2).astype(np.float32), expected)
    with pytest.raises(AssertionError, match="max error"):
        assert_close(expected + 1e-8, expected)  # fine for float32, not for a float64 result
    with pytest.raises(AssertionError, match="shape"):
        assert_close(expected[:, :1], expected)
