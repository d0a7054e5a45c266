"""Decoding the JPEGs a frontend sent compressed (EncodedImage): on the CPU, and a batch at once on a GPU.

The CPU decoder is the frontend's own (OpenCV's libjpeg-turbo, the same flags: EXIF
orientation ignored, BGR turned to RGB), so a JPEG decoded here has exactly the
pixels the frontend would have written into the ring, and the answers are the same
bytes whichever side decoded (tests/integration/test_jpeg_in_worker.py).

On a GPU, nvJPEG (torchvision.io.decode_jpeg with a CUDA device) decodes the whole
batch in one call. Its IDCT and chroma upsampling are not libjpeg-turbo's: pixels
differ by a few levels, so answers can differ slightly from the CPU decode
(docs/operations.md, "JPEG decoding"). An image nvJPEG refuses is decoded on the CPU
and copied to the device, so a JPEG the frontend accepted never fails for the decoder
it happened to meet.

torch is imported inside the GPU path only: the worker's core imports decode_cpu
before (and without) any engine.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import cv2
import numpy as np

from dd.worker.engines.base import EncodedImage, InputError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# The frontend's flags for a color image (dd/frontend/decode.py, _COLOR_FLAGS): the worker may not import
# the frontend, and a test checks that both decode to the same pixels.
COLOR_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION


def decode_cpu(image: EncodedImage, out: np.ndarray | None = None) -> np.ndarray:
    """H x W x 3 uint8 RGB, as the frontend decodes it; into `out` when given. InputError for data that
    does not decode, or decodes to another size than the header said."""
    try:
        bgr = cv2.imdecode(image.data, COLOR_FLAGS)
    except cv2.error:
        bgr = None
    if bgr is None or bgr.ndim != 3 or bgr.shape[2] != 3:
        raise InputError("color: the image could not be decoded (corrupt or unsupported data)")
    if bgr.shape[:2] != (image.height, image.width):
        raise InputError(f"color: decoded size {bgr.shape[1]}x{bgr.shape[0]} differs from its header's "
                         f"{image.width}x{image.height}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB, dst=out)


def decode_to_device(images: list[EncodedImage], device: "torch.device") -> list["torch.Tensor"]:
    """Each image as an H x W x 3 uint8 RGB tensor on `device` (a view of a 3 x H x W one on a GPU).

    On a GPU: one nvJPEG call for the whole batch; if it refuses the batch, each image alone, and
    those it still refuses on the CPU. Elsewhere: the CPU decoder (the frontend's pixels).
    """
    import torch

    if not images:
        return []
    if device.type != "cuda":
        return [torch.from_numpy(decode_cpu(im)).to(device) for im in images]
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.from_numpy(im.data) for im in images]
    try:
        decoded: list[torch.Tensor | None] = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        decoded = []
        for d in data:
            try:
                decoded.append(decode_jpeg([d], mode=ImageReadMode.RGB, device=device)[0])
            except RuntimeError as exc:
                log.debug("nvJPEG refused an image (%s); decoding it on the CPU", exc)
                decoded.append(None)
    out = []
    for im, chw in zip(images, decoded):
        if chw is None or tuple(chw.shape) != (3, im.height, im.width):
            # Refused, or a size nvJPEG read otherwise than the header: the CPU decoder decides.
            out.append(torch.from_numpy(decode_cpu(im)).to(device, non_blocking=False))
        else:
            out.append(chw.permute(1, 2, 0))
    return out
