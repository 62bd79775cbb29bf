"""The one image encode/decode path round-trips exactly and rejects what it cannot store."""

import numpy as np
import pytest

from mama_ray.data.shards import decode_image, encode_image


def test_png_round_trip_is_lossless_and_deterministic():
    img = np.random.default_rng(0).integers(0, 256, (37, 53), dtype=np.uint8)
    data = encode_image(img, "png")
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    np.testing.assert_array_equal(decode_image(data, "png"), img)
    assert encode_image(img) == data


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint16), np.zeros((4, 4, 3), np.uint8)])
def test_encode_rejects_non_uint8_grayscale(bad):
    with pytest.raises(ValueError, match="uint8"):
        encode_image(bad)


def test_unknown_codec_and_garbage_bytes_raise():
    with pytest.raises(ValueError, match="unknown image codec 'jpeg'"):
        encode_image(np.zeros((2, 2), np.uint8), "jpeg")
    with pytest.raises(ValueError, match="cannot decode"):
        decode_image(b"not an image", "png")
