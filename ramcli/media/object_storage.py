"""Photos on object storage (`s3://`, `gs://`, `file://`), through pyarrow's file systems:
listed as `ramcli tag` discovers a folder (`list_objects`), read whole (`read_object`). Photos
are recognised by extension, as listing reads no object, and recorded under their address.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

from ramcli.errors import UsageError
from ramcli.media.discover import (
    PHOTO_KINDS,
    PHOTO_SUFFIXES,
    RAW_SUFFIXES,
    SIDECAR_SUFFIXES,
    VIDEO_SUFFIXES,
    Found,
    walk_reaches,
)


def list_objects(uri: str, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> tuple[list[Found], Counter]:
    """The photos under an object-storage address, with the counts of what else was there.

    Listing reads no object, so photos are told by their extension (local discovery sniffs
    content); hidden and junk names, sidecars and the globs follow the local walk's rules. Each
    photo's `path` is its full address (a `str`), `size` and `mtime_ns` those of the listing.
    """
    import pyarrow as pa
    from pyarrow import fs as pafs

    try:
        filesystem, root = pafs.FileSystem.from_uri(uri)
        base = filesystem.get_file_info(root)
        if base.type == pafs.FileType.File:
            files = [(base.path, base.size, base.mtime_ns)]
        elif base.type == pafs.FileType.Directory:
            files = sorted((i.path, i.size, i.mtime_ns) for i in filesystem.get_file_info(
                pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File)
        else:
            raise UsageError(f"no such object or folder: {uri}")
    except UnicodeDecodeError:
        raise UsageError(f"cannot list {uri}: a name under it is not UTF-8 (object keys always are; "
                         "give a local folder as a path, not a file:// address)") from None
    except (OSError, ValueError, pa.ArrowException) as exc:
        raise UsageError(f"cannot list {uri}: {' '.join(str(exc).split())[:200]}") from None
    scheme = uri.split("://", 1)[0]
    photos, counts = [], Counter()
    for path, size, mtime_ns in files:
        if path != base.path and not walk_reaches(Path(root), Path(path), include, exclude):
            continue
        suffix = PurePosixPath(path).suffix.lower()
        if suffix in SIDECAR_SUFFIXES:
            continue
        kind = "raw" if suffix in RAW_SUFFIXES else "image" if suffix in PHOTO_SUFFIXES else \
            "video" if suffix in VIDEO_SUFFIXES else "unsupported"
        counts[kind] += 1
        if kind in PHOTO_KINDS:
            photos.append(Found(f"{scheme}://{path}", kind, size=size, mtime_ns=mtime_ns or 0))
    return photos, counts


def read_object(uri: str, filesystems: dict) -> tuple[bytes, int, int]:
    """An object's bytes with its size and mtime as read (as the local loader stats the file);
    one pyarrow file system per bucket, reused for the rest of the task."""
    from pyarrow import fs as pafs

    scheme, key = uri.split("://", 1)
    bucket = "" if scheme == "file" else key.split("/", 1)[0]
    if (scheme, bucket) not in filesystems:  # from the bucket's address: a key need not be a valid URI
        filesystems[scheme, bucket] = pafs.FileSystem.from_uri(f"{scheme}://{bucket or '/'}")[0]
    filesystem = filesystems[scheme, bucket]
    info = filesystem.get_file_info(key)
    with filesystem.open_input_file(key) as fh:
        return fh.readall(), int(info.size or 0), int(info.mtime_ns or 0)
