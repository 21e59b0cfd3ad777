"""The worker loader: bad photos never stop a batch, order is kept, pixels equal single-file decode."""

from __future__ import annotations

import torch
from images import make_image, make_library

from ramcli.imaging import load_for_model
from ramcli.loader import Batch, Failure, make_loader

S = 32


def run(paths, workers: int, batch_size: int = 4) -> list[Batch]:
    return list(make_loader(paths, S, batch_size=batch_size, workers=workers, pin_memory=False))


def check_library_run(tmp_path, workers: int) -> None:
    library = make_library(tmp_path / "lib")
    paths = sorted(library)
    batches = run(paths, workers)
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
