"""Photo decoding: formats decided by content, orientation, reduced decoding, crops and their fallback."""

import cv2
import numpy as np
import pytest
from PIL import Image

from reid.data import BadImage, decode, expand_box, load_photo, reduction


def gradient(w=120, h=80):
    x = np.linspace(0, 255, w, dtype=np.uint8)
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0], img[..., 1] = x[None, :], np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    return img  # RGB: red grows to the right, green downwards


def test_exif_rotation_is_applied(tmp_path):
    im = Image.fromarray(gradient())
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    im.save(tmp_path / "r.jpg", exif=exif, quality=95)
    out = decode(tmp_path / "r.jpg")
    assert out.shape == (120, 80, 3)
    assert out[0, :, 0].mean() < out[-1, :, 0].mean()  # red now grows downwards


@pytest.mark.parametrize("mode", ["L", "RGBA", "I;16", "CMYK"])
def test_other_modes_become_rgb(tmp_path, mode):
    src = Image.fromarray(gradient())
    if mode == "I;16":
        im = Image.fromarray(np.asarray(src.convert("L")).astype(np.uint16) * 257)
        path = tmp_path / "x.png"
    else:
        im = src.convert(mode)
        path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    im.save(path)
    out = decode(path)
    assert out.shape == (80, 120, 3) and out.dtype == np.uint8
    assert out[:, -10:].mean() > out[:, :10].mean() or mode == "CMYK" and out.std() > 10


def test_content_not_extension_decides(tmp_path):
    Image.fromarray(gradient()).save(tmp_path / "photo.png", format="JPEG")
    assert decode(tmp_path / "photo.png").shape == (80, 120, 3)


@pytest.mark.parametrize("content, match", [(b"", "empty"), (b"not an image at all", "not a readable image")])
def test_bad_files_raise_naming_the_file(tmp_path, content, match):
    path = tmp_path / "bad.jpg"
    path.write_bytes(content)
    with pytest.raises(BadImage, match=f"bad.jpg.*{match}|{match}"):
        decode(path)


def test_truncated_jpeg_is_detected(tmp_path):
    path = tmp_path / "t.jpg"
    cv2.imwrite(str(path), np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage, match="truncated"):
        decode(path)


def test_reduced_decoding_is_close_to_full(tmp_path):
    big = cv2.resize(gradient(), (1600, 1200), interpolation=cv2.INTER_LINEAR)
    cv2.imwrite(str(tmp_path / "b.jpg"), big[..., ::-1])
    assert reduction(1600, 1200, 128) == 8 and reduction(1600, 1200, 512) == 2 and reduction(300, 300, 256) == 1
    assert reduction(3000, 2000, 512) == 4 and reduction(3000, 2000, 512, slack=1.0) == 2
    fast, _ = load_photo(tmp_path / "b.jpg", 128)
    full = cv2.resize(decode(tmp_path / "b.jpg"), (128, 128), interpolation=cv2.INTER_AREA)
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 3


def test_crop_and_fallback(tmp_path):
    img = np.zeros((100, 200, 3), np.uint8)
    img[20:60, 50:150] = 255
    cv2.imwrite(str(tmp_path / "c.png"), img)
    crop, used = load_photo(tmp_path / "c.png", 32, box=(50, 20, 150, 60), margin=0.0)
    assert used and crop.mean() > 250
    whole, used = load_photo(tmp_path / "c.png", 32, box=(10, 10, 10, 50), margin=0.1)  # zero width
    assert not used and whole.mean() < 200
    assert expand_box((50, 20, 150, 60), 0.1, 200, 100) == (40, 16, 160, 64)
    assert expand_box((190, 90, 400, 400), 0.0, 200, 100) == (190, 90, 200, 100)
    assert expand_box((300, 300, 400, 400), 0.0, 200, 100) is None  # outside the photo
    assert expand_box((np.nan, 0, 5, 5), 0.0, 200, 100) is None
