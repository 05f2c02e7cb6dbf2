"""Where a corpus lives: a local folder or an fsspec URL (``s3://``, ``gs://``, ``https://``, ...).

Every read of a corpus — manifest, vocabulary, tokenizer, shard index, shards, both splits — and
every remote input of ``ptft prepare`` goes through fsspec with the same options
(``data.storage_options`` / ``prepare.storage_options``: endpoint, credentials, ...), so a
bucket that only answers with those options is read the same way by every stage. This module
holds the pieces those readers share: telling local from remote, opening a filesystem with a
clear error when its package is missing, and copying a remote folder (the corpus tokenizer) into
a local directory that appears whole or not at all.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from ptft_dist.errors import UserError
from ptft_dist.fsutil import remove_tree, replace_dir, temp_name

# protocol → the pip extra of ptft-dist that installs its fsspec implementation
EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}


class StorageError(UserError, OSError):
    """A remote location that cannot be opened as configured; the message says what to install or set."""


def protocol_of(url: str) -> str:
    """``s3`` for ``s3://bucket/x``; ``file`` for a local path."""
    return str(url).split("://", 1)[0].lower() if "://" in str(url) else "file"


def is_remote(url: str) -> bool:
    return protocol_of(url) not in ("file", "local")


def join(url: str, *parts: str) -> str:
    """``url/part/...`` for local paths and URLs alike (no ``os.path`` rules on URLs)."""
    return "/".join([str(url).rstrip("/"), *(p.strip("/") for p in parts)])


def missing_backend_hint(url: str, exc: ImportError) -> str:
    """``exc`` (fsspec's "Install s3fs to access S3") with the ptft extra that installs the package."""
    extra = EXTRAS.get(protocol_of(url))
    hint = f"; pip install 'ptft-dist[{extra}]'" if extra else ""
    return f"{url}: {exc}{hint}"


def url_to_fs(url: str, storage_options: Optional[dict] = None, **kwargs):
    """``fsspec.core.url_to_fs`` with the storage options; a missing protocol package is a
    :class:`StorageError` naming the extra to install."""
    import fsspec

    try:
        return fsspec.core.url_to_fs(str(url), **{**(storage_options or {}), **kwargs})
    except ImportError as exc:
        raise StorageError(missing_backend_hint(url, exc)) from None
    except ValueError as exc:  # unknown protocol
        raise StorageError(f"{url}: cannot open this URL ({exc})") from None


def _list_files(fs, root: str, known: tuple[str, ...]) -> list[str]:
    """The files directly in ``root``; where the store cannot list (plain HTTP servers), those of
    ``known`` that exist."""
    try:
        names = [e["name"] for e in fs.ls(root, detail=True) if e.get("type") == "file"]
    except (FileNotFoundError, NotImplementedError, ValueError):
        names = []
    if names:
        return names
    return [f"{root}/{name}" for name in known if fs.exists(f"{root}/{name}")]


def copy_folder(url: str, dest: str | os.PathLike, storage_options: Optional[dict] = None,
                known: tuple[str, ...] = (), required: str = "") -> Path:
    """The files directly in folder ``url`` (local or remote; ``known`` names where it cannot be
    listed), copied into ``dest``: a temporary sibling first, renamed into place when every file is
    there (docs/design.md, guarantee 5). ``required``: a file name that must be among them."""
    dest = Path(dest)
    fs, root = url_to_fs(url, storage_options)
    root = root.rstrip("/")
    tmp = temp_name(dest)
    try:
        files = {p.rstrip("/").rsplit("/", 1)[-1]: p for p in _list_files(fs, root, known)}
        if not files or (required and required not in files):
            raise StorageError(f"{url}: no {required or 'files'} there")
        tmp.mkdir(parents=True)
        for name, path in files.items():
            (tmp / name).write_bytes(fs.cat_file(path))
        replace_dir(tmp, dest)
    except StorageError:
        remove_tree(tmp)
        raise
    except Exception as exc:  # remote stores raise their own classes (botocore's NoCredentialsError, ...)
        remove_tree(tmp)
        raise StorageError(f"{url}: cannot read ({type(exc).__name__}: {exc}; check the storage options)") from None
    except BaseException:
        remove_tree(tmp)
        raise
    return dest
