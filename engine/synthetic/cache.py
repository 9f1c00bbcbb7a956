"""leanclip's per-user cache folder, private folders, and the synthetic split dataset built once, published
with one atomic rename and checked against its sha256 manifest before each use."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid

from leanclip.synthetic.classes import make_classes
from leanclip.synthetic.sets import write_split_file


# ----------------------------------------------------------------------------------------------------------------------
# Per-user cache of written datasets

CACHE_ENV = "LEANCLIP_CACHE_DIR"
MANIFEST = "manifest.json"
_CACHE_FORMAT = 2  # part of the cache key: bump when the written layout or the manifest changes


def cache_dir() -> str:
    """leanclip's per-user cache folder: ``$LEANCLIP_CACHE_DIR``, else ``$XDG_CACHE_HOME/leanclip``, else
    ``~/.cache/leanclip`` (the XDG default). Not created here."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return os.path.abspath(os.path.expanduser(explicit))
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = xdg if xdg and os.path.isabs(xdg) else os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "leanclip")


def private_dir(path: str | os.PathLike, what: str = "cache folder") -> str:
    """Create `path` (and its parents) with mode 0700 if missing -> its path; ValueError naming it when it exists but
    another user owns it or group / others may write to it (someone else could then swap the data a run reads)."""
    path = os.fspath(path)
    os.makedirs(path, mode=0o700, exist_ok=True)
    st = os.stat(path)
    getuid = getattr(os, "getuid", None)  # POSIX only; elsewhere the folder's ACLs are the user's business
    if getuid is not None and st.st_uid != getuid():
        raise ValueError(f"{what} {path!r} belongs to another user (uid {st.st_uid}); refusing to use it")
    if getuid is not None and st.st_mode & 0o022:
        raise ValueError(f"{what} {path!r} is writable by group or others (mode {st.st_mode & 0o777:o}); "
                         f"refusing to use it (chmod go-w it, or choose another folder)")
    return path


def _sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files_under(root: str) -> dict[str, str]:
    """relative path ('/'-separated) -> absolute path of every entry below `root` except the manifest; folders are
    walked, anything else (symlinks included) is listed so that the manifest check sees it."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        names = filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]
        for name in sorted(names):
            full = os.path.join(dirpath, name)
            rel = os.path.relpath(full, root).replace(os.sep, "/")
            if rel != MANIFEST:
                out[rel] = full
    return out


def write_manifest(root: str | os.PathLike) -> str:
    """Write ``root/manifest.json`` = {"format", "files": {relpath: sha256}} over every file below `root`."""
    from leanclip.utils import atomic_write_json

    root = os.fspath(root)
    files = {rel: _sha256_file(full) for rel, full in _files_under(root).items()}
    path = os.path.join(root, MANIFEST)
    atomic_write_json(path, {"format": _CACHE_FORMAT, "files": files}, indent=None)
    return path


def manifest_problem(root: str | os.PathLike) -> str | None:
    """None when the files below `root` are exactly those its manifest lists, with the recorded sha256; otherwise
    the first difference found, in words."""
    root = os.fspath(root)
    try:
        with open(os.path.join(root, MANIFEST), encoding="utf-8") as f:
            manifest = json.load(f)
        recorded = manifest["files"]
        if manifest.get("format") != _CACHE_FORMAT or not isinstance(recorded, dict):
            return "the manifest has another format"
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        return f"no readable manifest ({type(e).__name__})"
    present = _files_under(root)
    if set(present) != set(recorded):
        extra, gone = sorted(set(present) - set(recorded)), sorted(set(recorded) - set(present))
        return f"files differ from the manifest (unlisted {extra[:3]}, missing {gone[:3]})"
    for rel, full in present.items():
        if os.path.islink(full) or not os.path.isfile(full):
            return f"{rel!r} is not a regular file"
        if _sha256_file(full) != recorded[rel]:
            return f"{rel!r} does not match its recorded sha256"
    return None


def cached_split_dataset(
    base: str | os.PathLike, n_classes: int, size: int, n_train: int, n_val: int, n_test: int, *, seed: int = 0
) -> str:
    """Folder under `base` holding the `write_split_file` dataset of ``make_classes(n_classes, seed)`` (read it
    with ``leanclip.data.load_dataset(root, "Synthetic")``), built on first use and checked on every use.

    The folder name hashes the arguments. A dataset is built in a temp folder, given a manifest (`write_manifest`)
    and published with one rename, so readers never see half a dataset. Before use, the files are checked against
    the manifest; on any difference (an interrupted older layout, a corrupted or edited file) the dataset is rebuilt
    and swapped in the same way. Rebuilding rather than refusing: the content is a pure function of the arguments,
    cheap to regenerate, and the rebuilt copy is exactly what the run asked for, so there is nothing for the user
    to decide. `base` is used as given (the caller picks a private folder; see `private_dir`).
    """
    base = os.fspath(base)
    key = hashlib.sha256(json.dumps([_CACHE_FORMAT, n_classes, size, n_train, n_val, n_test, seed]).encode())
    root = os.path.join(base, f"synthetic-{key.hexdigest()[:12]}")
    if os.path.isdir(root) and manifest_problem(root) is None:
        return root
    classes = make_classes(n_classes, seed=seed)
    os.makedirs(base, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-synthetic-", dir=base)
    try:
        write_split_file(tmp, classes, n_train, n_val, n_test, size=size, seed=seed)
        write_manifest(tmp)
        _publish_dir(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _publish_dir(tmp: str, root: str) -> None:
    """Move the finished folder `tmp` to `root`: a plain rename, or, when `root` holds a stale copy, rename that
    aside first and remove it after. A concurrent builder that published a valid copy first wins."""
    try:
        os.rename(tmp, root)
        return
    except OSError:
        if os.path.isdir(root) and manifest_problem(root) is None:
            return  # another process published the same dataset meanwhile
    stale = os.path.join(os.path.dirname(root), f".stale-{uuid.uuid4().hex}")
    try:
        os.rename(root, stale)
    except FileNotFoundError:
        pass
    try:
        os.rename(tmp, root)
    except OSError:
        if not (os.path.isdir(root) and manifest_problem(root) is None):
            raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)
