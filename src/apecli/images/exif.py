"""Photos stored turned: the EXIF orientation tag, read from a PIL image or from a JPEG's bytes, and the
turn that shows a decoded image upright, as PIL's ``ImageOps.exif_transpose`` does."""

from __future__ import annotations

import warnings

import numpy as np


def pil_orientation(image) -> int:
    """A PIL image's EXIF orientation, 1 where it has none or its EXIF cannot be read (as stored, then)."""
    try:
        with warnings.catch_warnings():  # PIL warns of a damaged EXIF block, image after image
            warnings.simplefilter("ignore")
            return int(image.getexif().get(ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - a damaged EXIF block does not make the image unreadable
        return 1


ORIENTATION = 0x0112  # the EXIF tag
# EXIF orientation → the PIL transpose that turns the stored pixels upright, by Image.Transpose's value:
# FLIP_LEFT_RIGHT 0, FLIP_TOP_BOTTOM 1, ROTATE_90 2, ROTATE_180 3, ROTATE_270 4, TRANSPOSE 5, TRANSVERSE 6
TRANSPOSES = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}


def exif_orientation(data) -> int:
    """The EXIF orientation (1 to 8) that JPEG bytes carry, 1 where they carry none or cannot say.

    Reads the application segments that open the file (where the Exif standard puts its APP1 segment)
    and in an APP1 ``Exif`` segment the first directory of its TIFF header: a few hundred bytes,
    without decoding anything.
    """
    head = memoryview(data if isinstance(data, bytes) else np.ascontiguousarray(data, dtype=np.uint8)).cast("B")
    if head[:2] != b"\xff\xd8":
        return 1
    at = 2
    while at + 4 <= len(head) and head[at] == 0xFF:
        marker, length = head[at + 1], int.from_bytes(head[at + 2 : at + 4], "big")
        if not (0xE0 <= marker <= 0xEF or marker == 0xFE) or length < 2:  # past the APPn and comments
            break
        if marker == 0xE1 and head[at + 4 : at + 10] == b"Exif\0\0":
            return _tiff_orientation(head[at + 10 : at + 2 + length])
        at += 2 + length
    return 1


def _tiff_orientation(tiff: memoryview) -> int:
    order = {b"II": "little", b"MM": "big"}.get(bytes(tiff[:2]))
    if order is None or len(tiff) < 8:
        return 1
    directory = int.from_bytes(tiff[4:8], order)
    count = int.from_bytes(tiff[directory : directory + 2], order) if directory + 2 <= len(tiff) else 0
    for entry in range(directory + 2, min(directory + 2 + 12 * count, len(tiff) - 11), 12):
        if int.from_bytes(tiff[entry : entry + 2], order) == ORIENTATION:
            value = int.from_bytes(tiff[entry + 8 : entry + 10], order)  # a SHORT, first in its value field
            return value if 1 <= value <= 8 else 1
    return 1


UNDO = {6: 8, 8: 6}  # the orientation whose turn undoes each one's (the others undo themselves)


def turn_upright(image, orientation: int):
    """A C×H×W tensor as stored, turned as EXIF ``orientation`` says (what PIL's transposes do)."""
    import torch

    if orientation in (5, 6, 7, 8):  # a quarter turn: height and width swap
        image = image.transpose(-2, -1)
        orientation = {5: 1, 6: 2, 7: 3, 8: 4}[orientation]
    if orientation == 2:
        return torch.flip(image, (-1,))
    if orientation == 3:
        return torch.flip(image, (-2, -1))
    if orientation == 4:
        return torch.flip(image, (-2,))
    return image
