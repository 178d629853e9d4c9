"""Reading a site's images (PNG, JPEG, DICOM) into one grayscale array in [0, 1].

DICOM follows the display pipeline of PS3.3 C.11 and PS3.4 N.2 (pydicom does the decoding):
1. decode the first frame only: a multi-frame image (a cine loop, a tomosynthesis stack) is
   represented by its first frame;
2. the modality LUT (Rescale Slope / Intercept, or a Modality LUT Sequence) -> stored units;
3. the VOI LUT when present: the first Window Center / Width pair (LINEAR, LINEAR_EXACT or
   SIGMOID, PS3.3 C.11.2.1.2) or the first VOI LUT Sequence table; without one, the frame's
   own minimum..maximum is stretched to [0, 1];
4. MONOCHROME1 (0 = white) is inverted so that 1 is always white;
5. colour (RGB, YBR, PALETTE COLOR) -> luma Y = 0.299 R + 0.587 G + 0.114 B (ITU-R BT.601).

PNG and JPEG are read with Pillow: 8-bit as value / 255, 16-bit grayscale as value / 65535,
colour converted to luma. The encoder gets the grayscale copied into its 3 input channels.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, SupportsFloat

import numpy as np
import pydicom
from PIL import Image, UnidentifiedImageError
from pydicom.errors import InvalidDicomError
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, apply_voi
from pydicom.pixels.utils import pixel_array

from common.errors import BadData

DICOM_SUFFIXES = (".dcm", ".dicom")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")  # read with Pillow without sniffing the file
LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as Pillow's convert("L")
# pydicom names decoder plugins by module; a PyPI name that differs gets this prefix (python-gdcm)
PLUGIN_PACKAGES = {"gdcm": "python-"}


class ImageReadError(BadData):
    """An image file cannot be read; the message says why and what to install or fix."""


def is_dicom(path: Path) -> bool:
    """A DICOM file: .dcm/.dicom name, or (no image suffix) the 'DICM' marker after the preamble."""
    suffix = path.suffix.lower()
    if suffix in (*DICOM_SUFFIXES, *PIL_SUFFIXES):
        return suffix in DICOM_SUFFIXES
    with path.open("rb") as fh:
        return fh.read(132)[128:] == b"DICM"


def read_gray(path: Path) -> np.ndarray:
    """Any supported image -> (H, W) float32 in [0, 1], 1 = white; raises ImageReadError."""
    try:
        gray = read_dicom_gray(path) if is_dicom(path) else read_pil_gray(path)
    except OSError as err:
        raise ImageReadError(f"cannot open {path} ({err.strerror or err}).") from err
    return gray.astype(np.float32, copy=False)


def read_pil_gray(path: Path) -> np.ndarray:
    """A PNG/JPEG (anything Pillow opens) -> (H, W) in [0, 1]."""
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit grayscale PNG
                # numpy's stubs type this clip as Any
                scaled: np.ndarray = np.clip(np.asarray(img, dtype=np.float32) / 65535.0, 0.0, 1.0)
                return scaled
            if img.mode == "F":
                return _stretch(np.asarray(img, dtype=np.float64))
            return np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    except (UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise ImageReadError(f"{path} is not a readable PNG/JPEG image ({err}).") from err


def read_dicom_gray(path: Path) -> np.ndarray:
    """A DICOM file's first frame through the display pipeline -> (H, W) in [0, 1]."""
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, EOFError, ValueError, KeyError) as err:
        raise ImageReadError(f"{path} is not a valid DICOM file ({err}).") from err
    if "PixelData" not in ds:
        raise ImageReadError(
            f"{path} is a DICOM file without pixel data (a report, a structure "
            "set, or a truncated file?); the image column must name an image."
        )
    _check_decoder(path, ds)
    try:
        frame = pixel_array(ds, index=0)  # (H, W) or (H, W, 3): the first frame only
        return _display_gray(frame, ds)
    except (ValueError, AttributeError, KeyError, IndexError, TypeError, RuntimeError) as err:
        raise ImageReadError(f"{path}: cannot decode the DICOM pixel data ({err}).") from err


def _check_decoder(path: Path, ds: pydicom.Dataset) -> None:
    """Compressed pixel data needs a decoder plugin; name the packages that provide one."""
    tsyntax = ds.file_meta.get("TransferSyntaxUID")
    if tsyntax is None or not tsyntax.is_compressed:
        return
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as err:
        raise ImageReadError(
            f"{path}: no decoder exists for transfer syntax {tsyntax.name}; "
            "convert the file (e.g. to Explicit VR Little Endian)."
        ) from err
    if decoder.is_available:
        return
    options = [_install_hint(text) for text in decoder.missing_dependencies]
    raise ImageReadError(
        f"{path}: pixel data is compressed as {tsyntax.name} and no installed decoder reads it. "
        f"Install one of: {'; '.join(options)} (then restart the site)."
    )


def _install_hint(missing: str) -> str:
    """'pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-libjpeg>=2.1' -> a pip command."""
    plugin, _, needs = missing.partition(" - requires ")
    reqs = [
        r.strip()
        for r in needs.replace(",", " and ").split(" and ")
        if r.strip() not in ("", "numpy")
    ]
    reqs = [PLUGIN_PACKAGES.get(r.split(">")[0].split("=")[0], "") + r for r in reqs]
    return f"{plugin.strip()}: pip install " + " ".join(f"'{r}'" for r in reqs)


def _display_gray(frame: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """One decoded frame -> (H, W) in [0, 1] (modality LUT, VOI LUT, MONOCHROME1, colour)."""
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(frame, ds)  # (H, W, 3)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])  # the LUT entries' bit depth
        palette_gray: np.ndarray = (rgb @ LUMA) / float(2**bits - 1)  # matmul: Any in numpy's stubs
        return palette_gray
    if frame.ndim == 3:  # RGB (pydicom converts YBR to RGB)
        colour_gray: np.ndarray = (frame.astype(np.float64) @ LUMA) / float(
            2 ** int(ds.BitsStored) - 1
        )
        return colour_gray
    values = apply_modality_lut(frame, ds)  # stored units; still integers without a rescale
    if "WindowCenter" in ds and "WindowWidth" in ds:
        gray = window(
            values.astype(np.float64),
            center=_first(ds.WindowCenter),
            width=_first(ds.WindowWidth),
            function=str(ds.get("VOILUTFunction", "LINEAR")),
        )
    elif "VOILUTSequence" in ds:
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        gray = apply_voi(values, ds, index=0).astype(np.float64) / (2**bits - 1)
    else:
        gray = _stretch(values.astype(np.float64))
    return 1.0 - gray if photometric == "MONOCHROME1" else gray


def window(
    values: np.ndarray, *, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """VOI windowing of PS3.3 C.11.2.1.2 with output range [0, 1]."""
    function = function.upper()
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR":  # C.11.2.1.2.1: the half-pixel convention of the standard
        center, width = center - 0.5, width - 1.0
    elif function != "LINEAR_EXACT":
        raise ValueError(f"unknown VOI LUT Function {function!r}")
    if width <= 0:  # a LINEAR window of width 1 is a threshold at the centre
        return (values > center).astype(np.float64)
    return np.clip((values - center) / width + 0.5, 0.0, 1.0)


def _first(value: str | SupportsFloat | pydicom.multival.MultiValue[Any]) -> float:
    """The first value of a possibly multi-valued DICOM element (DS)."""
    return float(value[0]) if isinstance(value, pydicom.multival.MultiValue) else float(value)


def _stretch(values: np.ndarray) -> np.ndarray:
    """Min..max of the image -> 0..1 (a constant image -> 0)."""
    low, high = float(values.min()), float(values.max())
    return (values - low) / (high - low) if high > low else np.zeros_like(values)
