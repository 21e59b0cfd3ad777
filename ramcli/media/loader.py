"""Decode photos in worker processes and hand the model batches of uint8 pixels.

Decode, not the model, is the bottleneck on big libraries (a 12 MP JPEG costs tens of ms per
core), so it runs in a torch DataLoader's persistent worker processes with prefetch. A bad
photo must never stop a batch: `__getitem__` never raises, it returns a failure record, and
the collate function separates failures from the good pixels. Order is deterministic (the
input order), whatever the number of workers.

On a GPU, CPU decoding cannot keep up, so with `defer_jpeg` the workers only parse plain JPEGs
and hand over their bytes (`Batch.deferred`); `decode_deferred` decodes them on the model's
device (nvJPEG) just before the forward pass.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset

from ramcli.media.decode import ImageError, load_for_model
from ramcli.media.deferred_jpeg import decode_jpegs


class Failure(NamedTuple):
    """A photo that could not be decoded, with its one-line reason."""

    path: Path
    reason: str


@dataclass(frozen=True)
class Item:
    """What the index needs about one decoded photo (a `Decoded` without its pixels).

    `size` and `mtime_ns` are those of the file as it was read, for incremental runs.
    """

    path: Path
    width: int
    height: int
    taken_at: datetime | None
    content_hash: str
    size: int
    mtime_ns: int


class Deferred(NamedTuple):
    """A JPEG left for the model's device to decode: row `row` of the batch's pixels."""

    row: int
    encoded: torch.Tensor
    orientation: int


@dataclass
class Batch:
    """Up to `batch_size` photos: stacked pixels of those that decoded, in input order.

    `pixels[i]` belongs to `items[i]`; `pixels` is (0, 3, S, S) when every photo failed.
    With device decoding, the photos named in `deferred` have no row yet (`pixels` holds the
    others, in order) until `decode_deferred`: no placeholder pixels cross the process
    boundary or the bus.
    """

    pixels: torch.Tensor
    items: list[Item] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    deferred: list[Deferred] = field(default_factory=list)

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pin-memory thread: page-locked pixels copy to the GPU asynchronously."""
        return Batch(self.pixels.pin_memory(), self.items, self.failures, self.deferred)

    def _decoded_rows(self) -> list[int]:
        """The item rows that `pixels` holds, in order."""
        waiting = {d.row for d in self.deferred}
        return [i for i in range(len(self.items)) if i not in waiting]

    def select(self, keep: list[int]) -> Batch:
        """The batch with only the photos at item rows `keep` (in order), deferred rows renumbered."""
        rows = {old: new for new, old in enumerate(keep)}
        pixel_row = {item: k for k, item in enumerate(self._decoded_rows())}
        deferred = [d._replace(row=rows[d.row]) for d in self.deferred if d.row in rows]
        return Batch(self.pixels[[pixel_row[i] for i in keep if i in pixel_row]], [self.items[i] for i in keep],
                     self.failures, deferred)


def decode_deferred(batch: Batch, size: int, device: torch.device, interpolation: str = "bilinear") -> Batch:
    """The batch with its deferred JPEGs decoded on `device` and every photo's pixels there, in
    item order; a JPEG that fails to decode moves from the items to the failures."""
    pixels = torch.empty((len(batch.items), 3, size, size), dtype=torch.uint8, device=device)
    pixels[batch._decoded_rows()] = batch.pixels.to(device, non_blocking=True)
    decoded = decode_jpegs([d.encoded for d in batch.deferred], [d.orientation for d in batch.deferred], size, device,
                           interpolation)
    failures, bad = list(batch.failures), set()
    for d, result in zip(batch.deferred, decoded):
        if isinstance(result, str):
            failures.append(Failure(batch.items[d.row].path, result))
            bad.add(d.row)
        else:
            pixels[d.row] = result
    done = Batch(pixels, batch.items, failures)
    return done.select([i for i in range(len(batch.items)) if i not in bad]) if bad else done


#: At most this many photos decoded at once in-process: each holds its full-size decode (36 MB
#: for 12 MP) until it is resized.
MAX_DECODE_THREADS = 8


def usable_cores() -> int:
    """The cores this process may run on (its affinity, as taskset or a container limits it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def decode_threads(workers: int) -> int:
    """Photos of a batch decoded at once by each decoder: in-process (no workers) every core, as
    the model waits for the batch anyway; in a worker one, the workers being the parallelism."""
    return min(MAX_DECODE_THREADS, usable_cores()) if workers == 0 else 1


class PhotoDataset(Dataset):
    """Photos by index; each item is `(pixels, Item)` or a `Failure`, never an exception.

    `threads`: how many photos of a batch are decoded at once (`__getitems__`). Pillow's decode
    and resize release the GIL, so decoding in-process between two model calls can use every
    core instead of one.
    """

    def __init__(self, paths: list[Path], size: int, draft: bool = False, defer_jpeg: bool = False,
                 interpolation: str = "bilinear", threads: int = 1):
        self.paths = [Path(p) for p in paths]
        self.size = size
        self.draft = draft
        self.defer_jpeg = defer_jpeg
        self.interpolation = interpolation
        self.threads = threads

    def __len__(self) -> int:
        return len(self.paths)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, Item] | Failure]:
        """A batch's records in order, decoded `threads` at a time."""
        if self.threads <= 1 or len(indices) <= 1:
            return [self[i] for i in indices]
        # Each decode silences Pillow's warnings with `catch_warnings`, which is not thread-safe:
        # threads leaving it out of order could restore each other's filters. Entered here, in
        # the calling thread, it holds the filters that every thread saves, and restores them last.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pool = ThreadPoolExecutor(min(self.threads, len(indices)))
            try:
                return list(pool.map(self.__getitem__, indices))
            finally:
                pool.shutdown(cancel_futures=True)  # after a Ctrl-C, photos not yet started stay undecoded

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Item] | Failure:
        path = self.paths[index]
        try:
            st = os.stat(path)
            decoded = load_for_model(path, self.size, draft=self.draft, defer_jpeg=self.defer_jpeg,
                                     interpolation=self.interpolation)
        except ImageError as exc:
            return Failure(path, str(exc))
        except PermissionError:
            return Failure(path, "permission denied")
        except FileNotFoundError:
            return Failure(path, "no such file or directory")
        except Exception as exc:  # noqa: BLE001 - a decoder bug on one file must not end the run
            return Failure(path, f"cannot decode image ({type(exc).__name__}: {' '.join(str(exc).split())[:160]})")
        item = Item(path, decoded.width, decoded.height, decoded.taken_at, decoded.content_hash, st.st_size, st.st_mtime_ns)
        if decoded.encoded is not None:
            return Deferred(-1, decoded.encoded, decoded.orientation), item
        return decoded.pixels, item


def collate(records: list[tuple[torch.Tensor, Item] | Failure], size: int) -> Batch:
    """Stack the good pixels, keep failures aside; order within each list is the input order."""
    pixels, items, failures, deferred = [], [], [], []
    for record in records:
        if isinstance(record, Failure):
            failures.append(record)
            continue
        data, item = record
        if isinstance(data, Deferred):
            deferred.append(data._replace(row=len(items)))
        else:
            pixels.append(data)
        items.append(item)
    stacked = torch.stack(pixels) if pixels else torch.empty((0, 3, size, size), dtype=torch.uint8)
    return Batch(stacked, items, failures, deferred)


class _Collate:
    """A picklable collate bound to the input size (workers may be spawned, not forked)."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, records: list) -> Batch:
        return collate(records, self.size)


def make_loader(
    paths: list[Path],
    size: int,
    batch_size: int,
    workers: int = 0,
    pin_memory: bool | None = None,
    draft: bool = False,
    prefetch_factor: int = 4,
    defer_jpeg: bool = False,
    interpolation: str = "bilinear",
    threads: int | None = None,
) -> DataLoader:
    """An iterable of `Batch`es over `paths`, decoded by `workers` processes (0: in-process),
    each decoding `threads` photos of a batch at once (None: `decode_threads(workers)`).

    `size` and `interpolation` are the model's data config; `draft`: JPEG draft mode (see
    `ramcli.media.decode`).

    `pin_memory=None` pins when CUDA is available (page-locked memory lets
    `pixels.to('cuda', non_blocking=True)` overlap the next batch's decode).
    """
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if workers > 0 else {}
    threads = decode_threads(workers) if threads is None else threads
    return DataLoader(
        PhotoDataset(paths, size, draft, defer_jpeg, interpolation, threads),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=_Collate(size),
        pin_memory=bool(pin_memory and torch.cuda.is_available()),
        **extra,
    )
