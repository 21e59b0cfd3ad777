"""The worker loader: bad photos never stop a batch, order is kept, pixels equal single-file decode."""

from __future__ import annotations

import io
import multiprocessing
import threading
import warnings

import numpy as np
import pytest
import torch
from images import make_image, make_library

from ramcli.media.decode import load_for_model
from ramcli.media.loader import Batch, Failure, decode_deferred, make_loader

S = 32


def run(paths, workers: int, batch_size: int = 4, threads: int = 1) -> list[Batch]:
    return list(make_loader(paths, S, batch_size=batch_size, workers=workers, pin_memory=False, threads=threads))


def check_library_run(tmp_path, workers: int, threads: int = 1) -> None:
    library = make_library(tmp_path / "lib")
    paths = sorted(library)
    batches = run(paths, workers, threads=threads)
    assert len(batches) == -(-len(paths) // 4)
    seen = []
    for batch in batches:
        assert batch.pixels.dtype == torch.uint8 and batch.pixels.shape == (len(batch.items), 3, S, S)
        for pixels, item in zip(batch.pixels, batch.items):
            expected = library[item.path]
            assert expected.decodes, item.path.name
            assert (item.width, item.height) == expected.size
            assert torch.equal(pixels, load_for_model(item.path, S).pixels)
            assert item.size == item.path.stat().st_size and item.mtime_ns == item.path.stat().st_mtime_ns
        for failure in batch.failures:
            expected = library[failure.path]
            assert not expected.decodes and expected.reason in failure.reason and "\n" not in failure.reason
        seen += sorted([i.path for i in batch.items] + [f.path for f in batch.failures], key=paths.index)
    assert seen == paths  # every photo exactly once, in input order


def test_library_in_process(tmp_path):
    check_library_run(tmp_path, workers=0)


def test_library_with_worker_processes(tmp_path):
    check_library_run(tmp_path, workers=2)


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in ("spawn", "forkserver") if m in multiprocessing.get_all_start_methods()])
def test_library_with_workers_started_fresh(tmp_path, method):
    """Decode workers that start as a fresh interpreter, as they do by default on macOS (spawn)
    and on Linux from Python 3.14 (forkserver): everything they are given must pickle."""
    old = multiprocessing.get_start_method(allow_none=True)
    multiprocessing.set_start_method(method, force=True)
    try:
        check_library_run(tmp_path, workers=2)
    finally:
        multiprocessing.set_start_method(old, force=True)


def test_library_in_process_on_several_threads(tmp_path):
    filters = list(warnings.filters)
    check_library_run(tmp_path, workers=0, threads=3)
    assert warnings.filters == filters  # the decoders' warning silencing does not outlive the run


def test_in_process_threads_decode_a_batch_at_once(tmp_path, monkeypatch):
    """Two photos of a batch are decoded at the same time: each waits for the other to start."""
    import ramcli.media.loader as loader

    paths = [tmp_path / f"{i}.jpg" for i in range(4)]
    for path in paths:
        make_image(path, "jpeg")
    both_started = threading.Barrier(2, timeout=10)

    def decode_alongside_another(*args, **kwargs):
        both_started.wait()
        return load_for_model(*args, **kwargs)

    monkeypatch.setattr(loader, "load_for_model", decode_alongside_another)
    (batch,) = run(paths, workers=0, batch_size=4, threads=2)
    assert batch.failures == [] and [i.path for i in batch.items] == paths


def test_bad_photos_in_the_middle_of_a_batch(tmp_path):
    kinds = ["jpeg", "zero_byte", "png", "truncated_jpeg", "text_as_jpg", "heic"]
    paths = [tmp_path / f"{i}_{k}.jpg" for i, k in enumerate(kinds)]
    for path, kind in zip(paths, kinds):
        make_image(path, kind)
    (batch,) = run(paths, workers=0, batch_size=len(paths))
    assert [i.path for i in batch.items] == [paths[0], paths[2], paths[5]]
    assert [f.reason for f in batch.failures] == ["empty file (0 bytes)", "image file is truncated", "not an image (text)"]
    assert all(isinstance(f, Failure) and f == (f.path, f.reason) for f in batch.failures)


def test_a_batch_of_only_failures_has_empty_pixels(tmp_path):
    make_image(tmp_path / "a.jpg", "zero_byte")
    (batch,) = run([tmp_path / "a.jpg", tmp_path / "missing.jpg"], workers=0)
    assert batch.pixels.shape == (0, 3, S, S) and batch.items == []
    assert [f.reason for f in batch.failures] == ["empty file (0 bytes)", "no such file or directory"]


def test_loader_settings(tmp_path):
    make_image(tmp_path / "a.jpg", "jpeg")
    loader = make_loader([tmp_path / "a.jpg"], S, batch_size=8, workers=2)
    assert loader.persistent_workers and loader.prefetch_factor >= 2
    assert loader.pin_memory == torch.cuda.is_available()
    assert make_loader([], S, batch_size=8, workers=0).num_workers == 0


# ------------------------------------------------------------------ decoding on the model's device
def test_device_decode_gives_the_same_photos_and_nearly_the_same_pixels(tmp_path):
    """`defer_jpeg`: plain JPEGs come back as bytes and are decoded by torchvision (the code path
    that is nvJPEG on CUDA, libjpeg here); every other file, and every failure, is as before."""
    library = make_library(tmp_path / "lib")
    paths = sorted(library)
    loader = make_loader(paths, S, batch_size=5, workers=0, pin_memory=False, defer_jpeg=True)
    deferred_names, items, failures = set(), [], []
    for raw in loader:
        deferred_names |= {raw.items[d.row].path.name for d in raw.deferred}
        batch = decode_deferred(raw, S, torch.device("cpu"))
        assert not batch.deferred and batch.pixels.shape == (len(batch.items), 3, S, S)
        for pixels, item in zip(batch.pixels, batch.items):
            exact = load_for_model(item.path, S, draft=False).pixels
            assert (pixels.int() - exact.int()).abs().max() <= 8, item.path.name  # full decode, torch resize
            assert (pixels.float() - exact.float()).abs().mean() < 1.0
        items += batch.items
        failures += batch.failures
    assert deferred_names == {"photo.jpg", "portrait (rotated).jpg", "grey.jpeg", "read only.jpg"}  # not CMYK, truncated
    workers = [b for b in run(paths, workers=0, batch_size=5)]
    assert [i.path for i in items] == [i for b in workers for i in (x.path for x in b.items)]
    assert items == [i for b in workers for i in b.items]  # same sizes, hashes, dates
    assert failures == [f for b in workers for f in b.failures]


def test_device_decode_orients_like_pillow(tmp_path):
    from PIL import Image, ImageOps
    from images import exif_with, jpeg_bytes, photo_like

    from ramcli.media.deferred_jpeg import decode_jpegs

    img = photo_like(60, 36, seed=3)
    for orientation in range(1, 9):
        data = jpeg_bytes(img, quality=95, exif=exif_with(orientation=orientation))
        want = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
        (got,) = decode_jpegs([torch.frombuffer(bytearray(data), dtype=torch.uint8)], [orientation],
                              S, torch.device("cpu"))
        expected = torch.from_numpy(np.array(want.resize((S, S), Image.Resampling.BILINEAR))).permute(2, 0, 1)
        assert (got.int() - expected.int()).abs().float().mean() < 1.5, orientation


def test_a_jpeg_that_fails_on_the_device_fails_alone(tmp_path):
    from images import jpeg_bytes, photo_like

    good = tmp_path / "good.jpg"
    good.write_bytes(jpeg_bytes(photo_like(40, 30, seed=1)))
    data = bytearray(jpeg_bytes(photo_like(40, 30, seed=2)))
    sos = data.find(b"\xff\xda")
    data[sos + 20 : -2] = b"\xff\x00\xff\xd0" * ((len(data) - sos - 22) // 4) + b"\x00" * ((len(data) - sos - 22) % 4)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(bytes(data[:sos]) + b"\xff\xc4\x00\x03\x00" + bytes(data[sos:]))  # a broken Huffman table
    (raw,) = list(make_loader([bad, good], S, batch_size=2, workers=0, pin_memory=False, defer_jpeg=True))
    assert len(raw.deferred) == 2  # Pillow's header parse does not read the Huffman tables
    batch = decode_deferred(raw, S, torch.device("cpu"))
    assert not raw.pixels.any()  # the loader's batch is left as it was
    assert [i.path for i in batch.items] == [good] and [f.path for f in batch.failures] == [bad]
    assert batch.failures[0].reason == "cannot decode JPEG (Bogus marker length)"
    assert torch.equal(batch.pixels[0], decode_deferred(raw.select([1]), S, torch.device("cpu")).pixels[0])


def test_device_decode_of_a_batch_larger_than_one_decoder_call(tmp_path):
    """Batches are decoded in chunks (GPU memory); order and pixels survive the chunking."""
    from images import jpeg_bytes, photo_like

    from ramcli.media.deferred_jpeg import decode_jpegs

    paths = []
    for i in range(40):
        paths.append(tmp_path / f"{i:02d}.jpg")
        paths[-1].write_bytes(jpeg_bytes(photo_like(24, 18, seed=i)))
    (raw,) = list(make_loader(paths, S, batch_size=40, workers=0, pin_memory=False, defer_jpeg=True))
    batch = decode_deferred(raw, S, torch.device("cpu"))
    assert [i.path for i in batch.items] == paths
    for row, path in enumerate(paths):
        (alone,) = decode_jpegs([torch.frombuffer(bytearray(path.read_bytes()), dtype=torch.uint8)], [1], S,
                                torch.device("cpu"))
        assert torch.equal(batch.pixels[row], alone)
