"""Image reading against pixel values computed by hand, on real DICOM files from pydicom-data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder

from common.data.dataset import ManifestDataset
from common.data.images import ImageReadError, read_gray, window
from common.data.manifest import Row
from common.model.encoders import load_tokenizer


def dicom(name: str) -> Path:
    """A DICOM test file from pydicom-data (dev extra) or pydicom itself; never downloaded."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"{name} not found: install the dev extra (pydicom-data)"
    return Path(path)


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 written out: the three cases of the standard, output 0..1."""
    out = (x - (center - 0.5)) / (width - 1) + 0.5
    out[x <= center - 0.5 - (width - 1) / 2] = 0.0
    out[x > center - 0.5 + (width - 1) / 2] = 1.0
    return out


def test_ct_rescale_then_window_matches_hand_formula() -> None:
    # 693_UNCI: CT, signed 14-bit stored, rescale intercept -1024, window 40 / 100 (soft tissue)
    ds = pydicom.dcmread(dicom("693_UNCI.dcm"))
    assert (ds.RescaleIntercept, ds.WindowCenter, ds.WindowWidth) == (-1024, 40, 100)
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = linear_window(hu, 40.0, 100.0)
    got = read_gray(dicom("693_UNCI.dcm"))
    assert got.shape == (512, 512) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert 0.05 < (got == 0).mean() < 0.95 and (got == 1).any()  # the window clips both ends


def test_mr_fractional_rescale_and_window_12_bit() -> None:
    ds = pydicom.dcmread(dicom("MR2_UNCI.dcm"))  # 12 bits stored, slope 3.774114
    assert int(ds.BitsStored) == 12
    values = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = linear_window(values, float(ds.WindowCenter), float(ds.WindowWidth))
    np.testing.assert_allclose(read_gray(dicom("MR2_UNCI.dcm")), expected, atol=1e-6)


def test_monochrome1_is_inverted_after_windowing() -> None:
    # RG1_UNCI: a computed radiograph stored MONOCHROME1 (0 = white), window 15000 / 30000
    ds = pydicom.dcmread(dicom("RG1_UNCI.dcm"))
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    px = ds.pixel_array.astype(np.float64)
    expected = 1.0 - linear_window(px, 15000.0, 30000.0)
    got = read_gray(dicom("RG1_UNCI.dcm"))
    np.testing.assert_allclose(got, expected, atol=1e-6)
    brightest_stored = np.unravel_index(np.argmax(px), px.shape)
    assert got[brightest_stored] == got.min()  # the largest stored value is displayed darkest


def test_voi_lut_sequence_8_bit() -> None:
    ds = pydicom.dcmread(dicom("vlut_04.dcm"))  # 8-bit, a VOI LUT table instead of a window
    item = ds.VOILUTSequence[0]
    entries, first, bits = (int(v) for v in item.LUTDescriptor)
    lut = np.asarray(item.LUTData, dtype=np.float64)
    expected = lut[np.clip(ds.pixel_array.astype(np.int64) - first, 0, entries - 1)] / (2**bits - 1)
    np.testing.assert_allclose(read_gray(dicom("vlut_04.dcm")), expected, atol=1e-6)


def test_modality_lut_sequence_without_window_is_stretched() -> None:
    ds = pydicom.dcmread(dicom("mlut_18.dcm"))  # 16-bit signed, a Modality LUT table, no window
    item = ds.ModalityLUTSequence[0]
    entries, first, _ = (int(v) for v in item.LUTDescriptor)
    lut = np.asarray(item.LUTData, dtype=np.float64)
    values = lut[np.clip(ds.pixel_array.astype(np.int64) - first, 0, entries - 1)]
    expected = (values - values.min()) / (values.max() - values.min())
    np.testing.assert_allclose(read_gray(dicom("mlut_18.dcm")), expected, atol=1e-6)


def test_multi_frame_reads_the_first_frame() -> None:
    ds = pydicom.dcmread(dicom("emri_small.dcm"))  # 10 frames, 12 bits stored, no window
    frames = ds.pixel_array.astype(np.float64)  # (10, 64, 64)
    first = (frames[0] - frames[0].min()) / (frames[0].max() - frames[0].min())
    got = read_gray(dicom("emri_small.dcm"))
    assert got.shape == (64, 64)
    np.testing.assert_allclose(got, first, atol=1e-6)
    assert not np.allclose(frames[0], frames[1])  # so the first frame is really the one chosen


def test_lossless_jpeg2000_reads_like_the_uncompressed_file() -> None:
    np.testing.assert_array_equal(
        read_gray(dicom("MR2_J2KR.dcm")), read_gray(dicom("MR2_UNCR.dcm"))
    )


def test_rgb_dicom_becomes_luma() -> None:
    ds = pydicom.dcmread(dicom("SC_rgb.dcm"))
    rgb = ds.pixel_array.astype(np.float64)  # (H, W, 3), 8 bit
    expected = (0.299 * rgb[..., 0] + 0.587 * rgb[..., 1] + 0.114 * rgb[..., 2]) / 255
    np.testing.assert_allclose(read_gray(dicom("SC_rgb.dcm")), expected, atol=1e-6)


def test_compressed_dicom_without_decoder_names_the_packages() -> None:
    path = dicom("JPEG-LL.dcm")  # JPEG Lossless (process 14): Pillow cannot decode it
    if get_decoder(pydicom.dcmread(path).file_meta.TransferSyntaxUID).is_available:
        pytest.skip("a JPEG Lossless decoder is installed here")
    with pytest.raises(ImageReadError) as err:
        read_gray(path)
    message = str(err.value)
    assert "JPEG Lossless" in message and "no installed decoder" in message
    assert "pip install 'pylibjpeg>=2.0' 'pylibjpeg-libjpeg>=2.1'" in message
    assert "python-gdcm" in message


@pytest.mark.parametrize(
    "content", [b"\0" * 128 + b"DICM" + b"\x02\x00garbage", b"not dicom at all"]
)
def test_corrupt_dicom_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "scan.dcm"
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=r"scan\.dcm"):
        read_gray(path)


def test_truncated_dicom_is_a_clear_error() -> None:
    with pytest.raises(ImageReadError, match="cannot decode the DICOM pixel data"):
        read_gray(dicom("MR_truncated.dcm"))


def test_png_8_and_16_bit_and_jpeg(tmp_path: Path) -> None:
    values8 = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(values8).save(tmp_path / "a.png")
    np.testing.assert_allclose(read_gray(tmp_path / "a.png"), values8 / 255.0, atol=1e-7)
    values16 = (np.arange(256, dtype=np.uint16) * 257).reshape(16, 16)
    Image.fromarray(values16).save(tmp_path / "b.png")  # a 16-bit grayscale PNG
    np.testing.assert_allclose(read_gray(tmp_path / "b.png"), values16 / 65535.0, atol=1e-6)
    Image.fromarray(np.full((16, 16), 200, dtype=np.uint8)).save(tmp_path / "c.jpg", quality=95)
    np.testing.assert_allclose(read_gray(tmp_path / "c.jpg"), 200 / 255.0, atol=2 / 255)
    (tmp_path / "d.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ImageReadError, match=r"d\.png"):
        read_gray(tmp_path / "d.png")


def test_dataset_feeds_a_dicom_to_the_encoder_as_three_equal_channels(tmp_path: Path) -> None:
    tokenizer = load_tokenizer("builtin:tiny")
    row = Row(2, dicom("CT_small.dcm"), "", "normal", "p1", None)
    item = ManifestDataset(tmp_path / "m.csv", [row], ("normal",), tokenizer, 32, 8)[0]
    images = item["images"]
    assert images.shape == (3, 32, 32)
    # undo the ImageNet normalisation: each channel holds the same grayscale in [0, 1]
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    gray = images * std.view(3, 1, 1) + mean.view(3, 1, 1)
    torch.testing.assert_close(gray[0], gray[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(gray[0], gray[2], atol=1e-5, rtol=0)
    assert float(gray.min()) >= -1e-5 and float(gray.max()) <= 1 + 1e-5


def test_window_sigmoid_and_linear_exact() -> None:
    x = np.array([0.0, 50.0, 100.0])
    np.testing.assert_allclose(
        window(x, center=50, width=100, function="LINEAR_EXACT"), [0.0, 0.5, 1.0]
    )
    np.testing.assert_allclose(
        window(x, center=50, width=100, function="SIGMOID"), 1 / (1 + np.exp(-4 * (x - 50) / 100))
    )
