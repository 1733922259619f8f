"""Image-file preprocessing for ``scratchcnn predict`` and the command end to end, on PNG/JPEG
files generated from real MNIST test digits (the mnist-sample set)."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

from scratchcnn.cli import main
from scratchcnn.data import load_dataset, normalize
from scratchcnn.formats.checkpoint import load_checkpoint
from scratchcnn.harness.images import ImageError, center_digit, grayscale_on_paper, load_digit
from scratchcnn.nn import no_grad


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist-sample")


def save_png(path, pixels: np.ndarray, mode: str = "L"):
    Image.fromarray(pixels).convert(mode).save(path)
    return path


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel().astype(float), b.ravel().astype(float))[0, 1])


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    ys, xs = np.indices(image.shape)
    mass = image.astype(float).sum()
    return (ys * image).sum() / mass, (xs * image).sum() / mass


def test_real_mnist_digits_come_back_almost_unchanged(mnist, tmp_path):
    # MNIST was made by this very recipe, so re-applying it must be close to the identity.
    for i in range(30):
        original = mnist.test_images[i, 0]
        loaded = load_digit(save_png(tmp_path / f"{i}.png", original))
        assert loaded.shape == (1, 28, 28) and loaded.dtype == np.uint8
        assert correlation(loaded[0], original) > 0.99, i


def test_dark_on_light_equals_light_on_dark(mnist, tmp_path):
    for i in range(10):
        digit = mnist.test_images[i, 0]
        light = load_digit(save_png(tmp_path / "light.png", digit))
        dark = load_digit(save_png(tmp_path / "dark.png", 255 - digit))
        np.testing.assert_array_equal(dark, light)
        big = np.asarray(Image.fromarray(255 - digit).resize((140, 140), Image.Resampling.BILINEAR))
        jpeg = tmp_path / "photo.jpg"
        Image.fromarray(big).convert("RGB").save(jpeg, quality=90)
        assert correlation(load_digit(jpeg)[0], light[0]) > 0.95


def test_large_off_centre_digit_is_fitted_and_centred(tmp_path):
    canvas = np.full((300, 200), 230, dtype=np.uint8)  # light paper
    canvas[20:140, 130:160] = 10  # a dark vertical bar near the top right: a "1"
    canvas[20:40, 110:160] = 10
    loaded = load_digit(save_png(tmp_path / "one.png", canvas, "RGB"))[0]
    rows = np.flatnonzero(loaded.max(axis=1) > 0)
    cols = np.flatnonzero(loaded.max(axis=0) > 0)
    assert rows[-1] - rows[0] + 1 <= 21 and cols[-1] - cols[0] + 1 <= 21
    assert rows[-1] - rows[0] + 1 >= 19  # the long side is scaled to ~20 pixels
    cy, cx = centre_of_mass(loaded)
    assert abs(cy - 14) < 1 and abs(cx - 14) < 1
    assert loaded[0].max() == 0 and loaded[:, 0].max() == 0  # the border stays black


def test_transparent_background_counts_as_paper(mnist, tmp_path):
    digit = mnist.test_images[3, 0]
    rgba = np.zeros((28, 28, 4), dtype=np.uint8)  # black ink, opacity = stroke strength
    rgba[..., 3] = digit
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    on_white = load_digit(save_png(tmp_path / "white.png", 255 - digit))
    assert correlation(load_digit(tmp_path / "alpha.png")[0], on_white[0]) > 0.99


def test_a_16_bit_png_is_scaled_to_8_bits_not_clipped(mnist, tmp_path):
    # PIL's convert("L") clips 16-bit values to 0..255: paper and ink both came out white.
    for i in range(5):
        digit = mnist.test_images[i, 0]
        eight = load_digit(save_png(tmp_path / "8.png", 255 - digit))
        wide = (65535 - digit.astype(np.uint16) * 257).astype(np.uint16)  # x 257: exact in 8 bits
        Image.fromarray(wide).save(tmp_path / "16.png")
        with Image.open(tmp_path / "16.png") as image:
            assert image.mode.startswith("I;16")
        np.testing.assert_array_equal(load_digit(tmp_path / "16.png"), eight)
    # The auditor's picture: paper at 60000, ink at 3000 (233 and 12 in 8 bits).
    page = np.full((60, 40), 60000, dtype=np.uint16)
    page[10:50, 18:24] = 3000
    Image.fromarray(page).save(tmp_path / "page.png")
    with Image.open(tmp_path / "page.png") as image:
        gray = grayscale_on_paper(image)
    assert gray[0, 0] == 233 and gray[30, 20] == 12
    assert (load_digit(tmp_path / "page.png") > 0).sum() > 40


def test_a_16_bit_png_with_a_transparent_key_colour_lays_it_on_paper(tmp_path):
    page = np.zeros((60, 40), dtype=np.uint16)  # 0 is the tRNS key: transparent, not black
    page[10:50, 18:24] = 3000
    Image.fromarray(page).save(tmp_path / "key.png", transparency=0)
    with Image.open(tmp_path / "key.png") as image:
        gray = grayscale_on_paper(image)
    assert gray[0, 0] == 255 and gray[30, 20] == 12


@pytest.mark.parametrize(("values", "mode", "expected"), [
    ([0, 3000, 65535], "I", [0, 12, 255]),  # how Pillow before 10 opened 16-bit PNGs
    ([0, 100, 255], "I", [0, 100, 255]),  # Image.convert("I") of an 8-bit picture
    ([0, 2**30, 2**31 - 1], "I", [0, 128, 255]),
    ([0.0, 0.5, 1.0], "F", [0, 128, 255]),
    ([0.0, 100.0, 255.0], "F", [0, 100, 255]),  # Image.convert("F") of an 8-bit picture
    ([0.0, 3000.0, 65535.0], "F", [0, 12, 255]),  # Image.convert("F") of a 16-bit picture
])
def test_int_and_float_pictures_are_scaled_by_their_range(values, mode, expected):
    dtype = np.int32 if mode == "I" else np.float32
    image = Image.fromarray(np.array([values] * 2, dtype=dtype), mode)
    assert image.mode == mode
    np.testing.assert_array_equal(grayscale_on_paper(image)[0], expected)


def test_blank_image_gives_blank_field():
    np.testing.assert_array_equal(center_digit(np.zeros((40, 30), np.uint8)), np.zeros((28, 28)))


def test_unreadable_or_missing_image_names_the_file(tmp_path):
    fake = tmp_path / "fake.png"
    fake.write_text("not an image")
    with pytest.raises(ImageError, match=re.escape(str(fake))):
        load_digit(fake)
    with pytest.raises(ImageError, match="no such image file"):
        load_digit(tmp_path / "missing.png")


# -- the command --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_path(tmp_path_factory):
    out = tmp_path_factory.mktemp("predict-run")
    status = main([
        "train", "--model", "tiny-cnn", "--dataset", "mnist-sample", "--limit-train", "1000",
        "--limit-test", "100", "--batch-size", "32", "--optimizer", "adam", "--lr", "0.002",
        "--epochs", "2", "--out", str(out), "--no-progress",
    ])
    assert status == 0
    return out / "last.npz"


LINE = re.compile(r"^(?P<path>.+): (?P<label>\d) \((?P<probability>[01]\.\d{3})\)$")


def test_predict_prints_class_and_probability_for_both_polarities(
    checkpoint_path, mnist, tmp_path, capsys
):
    count = 12
    light = [save_png(tmp_path / f"l{i}.png", mnist.test_images[i, 0]) for i in range(count)]
    dark = [save_png(tmp_path / f"d{i}.png", 255 - mnist.test_images[i, 0]) for i in range(count)]
    capsys.readouterr()
    assert main(["predict", str(checkpoint_path), *map(str, light + dark)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    matches = [LINE.match(line) for line in lines]
    assert all(matches), lines
    assert [m["path"] for m in matches] == [str(p) for p in light + dark]
    labels = np.array([int(m["label"]) for m in matches])
    probabilities = np.array([float(m["probability"]) for m in matches])
    assert np.all((probabilities >= 0.1) & (probabilities <= 1.0))  # argmax of 10 classes
    np.testing.assert_array_equal(labels[:count], labels[count:])

    # Same answers as the model on the original arrays (the preprocessing is near-identity).
    checkpoint = load_checkpoint(checkpoint_path)
    model = checkpoint.build_model().eval()
    images = normalize(mnist.test_images[:count], checkpoint.mean, checkpoint.std)
    with no_grad():
        direct = np.argmax(model(images), axis=1)
    assert np.mean(labels[:count] == direct) >= 11 / 12
    assert np.mean(direct == mnist.test_labels[:count]) >= 0.75  # the model did learn


def test_predict_refuses_a_bad_image_before_printing_anything(checkpoint_path, tmp_path, capsys):
    good = save_png(tmp_path / "good.png", np.zeros((28, 28), np.uint8))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"\xff\xd8\xff garbage")
    capsys.readouterr()
    assert main(["predict", str(checkpoint_path), str(good), str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(bad) in captured.err and "cannot read the image" in captured.err
