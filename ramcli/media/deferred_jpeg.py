"""Deferred JPEGs decoded on the model's device, a batch at a time.

`load_for_model(defer_jpeg=True)` leaves a plain JPEG undecoded in the worker; its bytes travel
to the model's device and are decoded there: nvJPEG on CUDA (one batched call per chunk),
libjpeg on the CPU, then oriented and resized as `ramcli.media.decode` does with Pillow.
"""

from __future__ import annotations

import warnings

import torch

#: EXIF orientation -> the tensor ops of PIL's `exif_transpose` on (C, H, W)
_ORIENT_OPS = {
    2: lambda t: t.flip(-1),
    3: lambda t: t.flip(-1).flip(-2),
    4: lambda t: t.flip(-2),
    5: lambda t: t.transpose(-1, -2),
    6: lambda t: torch.rot90(t, -1, (-2, -1)),
    7: lambda t: t.transpose(-1, -2).flip(-1).flip(-2),
    8: lambda t: torch.rot90(t, 1, (-2, -1)),
}


#: JPEGs decoded per call: a full-size 12 MP photo is 36 MB of pixels on the GPU, so a 128-photo
#: batch in one call would briefly need 4.6 GB next to the model
_DECODE_CHUNK = 32


def decode_jpegs(encoded: list[torch.Tensor], orientations: list[int], size: int,
                 device: torch.device, interpolation: str = "bilinear") -> list[torch.Tensor | str]:
    """Deferred JPEGs -> uint8 (3, size, size) on `device`, or a one-line reason per failure.

    torchvision's decoder: nvJPEG on CUDA (one batched call), libjpeg on the CPU. Then EXIF
    orientation and the antialiased resize (the data config's interpolation), as `load_for_model` does with Pillow
    (equal to within a few levels: a full decode, not draft mode). A batch that fails is
    decoded one by one (`_decode_one`) so only the bad photos fail.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | str] = []
    for start in range(0, len(encoded), _DECODE_CHUNK):
        chunk = encoded[start : start + _DECODE_CHUNK]
        with warnings.catch_warnings():  # torchvision 0.29 points to TorchCodec; its decode still works
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                images: list[torch.Tensor | str] = list(decode_jpeg(chunk, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                images = [_decode_one(data, device) for data in chunk]
        for img, orientation in zip(images, orientations[start : start + _DECODE_CHUNK]):
            if isinstance(img, str):
                out.append(img)
                continue
            img = _ORIENT_OPS.get(orientation, lambda t: t)(img)
            resized = torch.nn.functional.interpolate(img[None].float(), size=(size, size), mode=interpolation,
                                                      antialias=True, align_corners=False)
            out.append(resized[0].round_().clamp_(0, 255).to(torch.uint8))
    return out


def _decode_one(data: torch.Tensor, device: torch.device) -> torch.Tensor | str:
    """One JPEG on `device`; where the GPU decoder refuses it (a JPEG variant nvJPEG lacks, or
    a torchvision without nvJPEG), libjpeg on the CPU. Only a file both refuse is a failure."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    except RuntimeError as exc:
        error = exc
    if device.type != "cpu":
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB).to(device)
        except RuntimeError as exc:
            error = exc
    return f"cannot decode JPEG ({_decoder_message(error)})"


def _decoder_message(exc: Exception) -> str:
    """libjpeg's / nvJPEG's own words, without torchvision's 'function, file.cpp:line, ' prefix."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    message = " ".join(lines[0].split())  # CUDA errors go on with a C++ stack trace
    return (message.rsplit(", ", 1)[-1] if ".cpp:" in message else message)[:120]
