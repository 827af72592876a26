"""The shared preprocessing: the same pixels and features on both sides of the export."""

import io

import numpy as np
import pytest
from PIL import Image

from gansentry.manifest import Column, ImageInput, TabularInput, TabularPreprocessing
from gansentry.preprocessing import (
    InputError,
    PlainPng,
    array_to_png,
    decode_image,
    encode_columns,
    encode_record,
    fit_tabular,
    image_to_array,
    open_image,
    uint8_batch_to_array,
)

GREY32 = ImageInput(channels=1, height=32, width=32)


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_decoded_png_equals_training_batch_path():
    rng = np.random.default_rng(0)
    digits = rng.integers(0, 256, size=(3, 28, 28), dtype=np.uint8)
    batch = uint8_batch_to_array(digits, GREY32)
    assert batch.shape == (3, 1, 32, 32) and batch.dtype == np.float32
    for i in range(3):
        np.testing.assert_array_equal(decode_image(_png(digits[i]), GREY32), batch[i])


def test_colour_image_converted_to_grey_and_resized():
    rgb = np.zeros((50, 40, 3), np.uint8)
    rgb[..., 1] = 200
    x = decode_image(_png(rgb), GREY32)
    assert x.shape == (1, 32, 32)
    assert 0.0 <= x.min() <= x.max() <= 1.0


def test_png_roundtrip_of_reconstruction():
    x = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(1, 32, 32)
    back = decode_image(array_to_png(x), GREY32)
    assert np.max(np.abs(back - x)) <= 0.5 / 255 + 1e-6


RGB32 = ImageInput(channels=3, height=32, width=32)


@pytest.mark.parametrize("spec", [GREY32, RGB32])
@pytest.mark.parametrize("size", [(32, 32), (28, 28), (20, 44), (128, 128), (129, 128)])
def test_small_plain_pngs_decode_to_the_pixels_pillow_gives(spec, size):
    """The libspng path for small 8-bit PNGs in the model's layout must give exactly what
    Pillow gives for the same file, at the model's size and resized; larger ones, and PNGs
    of the other layout, go through Pillow."""
    rng = np.random.default_rng(size[0])
    shape = (size[1], size[0]) if spec.channels == 1 else (size[1], size[0], 3)
    data = _png(rng.integers(0, 256, size=shape, dtype=np.uint8))
    opened = open_image(data, spec)
    assert isinstance(opened, PlainPng) == (size[0] * size[1] <= 128 * 128)
    other = RGB32 if spec.channels == 1 else GREY32
    with Image.open(io.BytesIO(data)) as img:
        by_pillow, other_by_pillow = image_to_array(img, spec), image_to_array(img, other)
    fast = decode_image(data, spec)
    assert fast.shape == spec.shape and fast.dtype == np.float32
    np.testing.assert_array_equal(fast, by_pillow)
    assert not isinstance(open_image(data, other), PlainPng)
    np.testing.assert_array_equal(decode_image(data, other), other_by_pillow)


def test_a_plain_png_that_libspng_refuses_gets_pillows_verdict():
    data = _png(np.zeros((28, 28), np.uint8))
    truncated = data[: len(data) - 20]
    assert isinstance(open_image(truncated, GREY32), PlainPng)  # its header is intact
    with pytest.raises(InputError, match="truncated or corrupt"):
        decode_image(truncated, GREY32)
    with pytest.raises(InputError, match="over the limit"):
        open_image(data, GREY32, max_pixels=28 * 28 - 1)


def test_undecodable_and_oversized_images_are_input_errors():
    with pytest.raises(InputError, match="cannot decode"):
        decode_image(b"not an image", GREY32)
    big = _png(np.zeros((100, 100), np.uint8))
    with pytest.raises(InputError, match="over the limit"):
        decode_image(big, GREY32, max_pixels=5000)


def test_tabular_fit_encode_and_record_errors():
    cols = {"proto": ["tcp", "udp", "tcp", "icmp"], "bytes": [0.0, 10.0, 5.0, 20.0]}
    prep = fit_tabular(cols, symbolic=["proto"])
    assert prep.feature_names() == ["proto=icmp", "proto=tcp", "proto=udp", "bytes"]
    x = encode_columns(cols, prep)
    assert x.shape == (4, 4)
    np.testing.assert_allclose(x.min(axis=0), 0.0)
    np.testing.assert_allclose(x.max(axis=0), 1.0)
    np.testing.assert_array_equal(encode_record({"proto": "udp", "bytes": 10.0}, prep), x[1])
    TabularInput(num_features=4, feature_names=prep.feature_names(), preprocessing=prep)
    with pytest.raises(InputError, match="field 'proto' = \"sctp\" is not a category seen"):
        encode_record({"proto": "sctp", "bytes": 0.0}, prep)
    with pytest.raises(InputError, match="unknown field"):
        encode_record({"proto": "tcp", "bytes": 1.0, "colour": "red"}, prep)
    with pytest.raises(InputError, match="missing field 'bytes'"):
        encode_record({"proto": "tcp"}, prep)
    with pytest.raises(InputError, match="NaN"):
        encode_record({"proto": "tcp", "bytes": float("nan")}, prep)


def test_log_scaled_column_round_trips_through_the_manifest():
    cols = {"proto": ["tcp", "udp", "tcp"], "bytes": [0.0, 99.0, 9999.0], "rate": [0.0, 0.5, 1.0]}
    prep = fit_tabular(cols, symbolic=["proto"], log_columns=["bytes"])
    assert [c.transform for c in prep.columns] == ["none", "log1p", "none"]
    x = encode_columns(cols, prep)
    np.testing.assert_allclose(x[:, 2], [0.0, np.log(100) / np.log(10000), 1.0], rtol=1e-6)
    np.testing.assert_allclose(x[:, 3], [0.0, 0.5, 1.0])
    # The service reads the manifest back and encodes a record the same way.
    again = TabularPreprocessing.model_validate_json(prep.model_dump_json())
    np.testing.assert_array_equal(
        encode_record({"proto": "udp", "bytes": 99.0, "rate": 0.5}, again), x[1]
    )
    with pytest.raises(InputError, match="'bytes' is log-scaled and needs values >= 0"):
        encode_record({"proto": "tcp", "bytes": -5.0, "rate": 0.5}, again)
    with pytest.raises(ValueError, match=r"\['proto'\] must be numeric"):
        fit_tabular(cols, symbolic=["proto"], log_columns=["proto"])
    with pytest.raises(ValueError, match="cannot have a transform"):
        Column(name="proto", kind="symbolic", vocabulary=["tcp"], transform="log1p")
