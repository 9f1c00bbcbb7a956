"""Image folders and the files that list images, read as untrusted input: ``ImageRoot`` keeps every path
inside its root, ``ImageFolderSource`` reads a class-per-subfolder tree; the small readers here turn a missing or
malformed file into a ValueError naming it."""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence

from leanclip.data.records import IMG_EXTENSIONS, Sample
from leanclip.templates import clean_classname


# ----------------------------------------------------------------------------------------------------------------------
# Image folders


def _is_image(name: str, extensions: Sequence[str]) -> bool:
    return not name.startswith(".") and name.lower().endswith(tuple(extensions))


def list_images(folder: str, extensions: Sequence[str], root: ImageRoot | None = None) -> list[str]:
    """All image files under `folder` (recursive, hidden entries skipped), sorted for determinism.

    Symlinked folders are followed, each real folder once (a link back up the tree would otherwise repeat it until
    the path is too long); with `root`, every file must resolve inside that image root (see `ImageRoot`)."""
    out = []
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for f in sorted(filenames):
            if _is_image(f, extensions):
                path = os.path.join(dirpath, f)
                out.append(root.check(path, os.path.relpath(path, root.root), "file") if root else path)
    return out


def require_dir(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if not os.path.isdir(path):
        raise NotADirectoryError(f"{what} {path!r} is not a directory")


def require_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path!r} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path!r} is not a regular file")


def _read_text(path: str, what: str) -> str:
    """A data file's text. Undecodable or unreadable files are ValueErrors naming the file (the CLI prints them as
    one line) instead of a bare UnicodeDecodeError / PermissionError that does not say which file."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {path!r} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise ValueError(f"cannot read {what} {path!r}: {e.strerror or e}") from None


def read_json(path: str, what: str = "split file"):
    text = _read_text(path, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path!r} is not valid JSON: {e}") from None
    except RecursionError:  # json's decoder recurses once per nesting level
        raise ValueError(f"{what} {path!r} nests too deeply to be a {what}") from None


def read_lines(path: str, what: str) -> list[tuple[int, str]]:
    """(line number, stripped line) of the non-blank lines of a text list file."""
    return [(n, ln.strip()) for n, ln in enumerate(_read_text(path, what).splitlines(), 1) if ln.strip()]


class ImageRoot:
    """Resolves the image paths a data file names and keeps them inside one image root.

    A split file or list file comes from the internet as often as the images do, so the paths it names are untrusted:
    ``../``, an absolute path or a symlink must not make the engine read files outside the dataset (and train on or
    report them). A path counts as inside when its real path (``os.path.realpath``: symlinks and ``..`` resolved)
    lies under the real path of the root; the root itself may be a symlink. ``allow_outside=True`` switches the check
    off for layouts that point elsewhere on purpose. Real paths of directories are memoised, so the per-file cost is
    one ``lstat`` (ImageNet-size lists stay cheap).
    """

    def __init__(self, root: str, source: str, allow_outside: bool = False):
        self.root = root
        self.source = source  # e.g. "split file '/x/split_zhou_Pets.json'", for the error message
        self.allow_outside = allow_outside
        self._real_root = os.path.realpath(root)
        self._real_dirs: dict[str, str] = {}

    def join(self, rel: str, entry: str) -> str:
        """``join(root, rel)``, or ValueError naming the source, the entry, the path and the root."""
        return self.check(os.path.join(self.root, rel), rel, entry, absolute=os.path.isabs(rel))

    def check(self, full: str, rel: str, entry: str, *, absolute: bool = False) -> str:
        """`full` when it resolves inside the root (or outside is allowed); else the ValueError of `join`."""
        if self.allow_outside:
            return full
        if absolute or not self._inside(full):
            raise ValueError(
                f"{self.source}: {entry} path {rel!r} is outside the image root {self.root!r} (absolute, '..' or a "
                f"symlink leading out); pass allow_outside_root=True / --allow-outside-root if that is intended"
            )
        return full

    def _inside(self, full: str) -> bool:
        head, name = os.path.split(full)
        if name in ("", ".", ".."):
            real = os.path.realpath(full)
        else:
            real_head = self._real_dirs.get(head)
            if real_head is None:
                real_head = self._real_dirs[head] = os.path.realpath(head)
            real = os.path.join(real_head, name)
            if os.path.islink(real):
                real = os.path.realpath(real)
        return real == self._real_root or os.path.commonpath([real, self._real_root]) == self._real_root


class ImageFolderSource:
    """A class-per-subfolder tree: ``root/<class>/**/<image>``.

    Class folders are sorted by name and labelled 0..C-1; images are found recursively and sorted. `classnames` are
    the folder names cleaned with `clean_classname` (underscores -> spaces) unless ``clean_names=False``;
    `classname_map` (folder name -> class name, e.g. an ImageNet wnid -> "tench") overrides that per folder.

    Errors: FileNotFoundError for a missing root (naming it), ValueError when the root has no class folders or a class
    folder holds no image (naming the class), or when a symlink leads a file outside `root` (unless
    `allow_outside_root`: the folder may come from an archive as untrusted as a split file).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        *,
        extensions: Sequence[str] = IMG_EXTENSIONS,
        clean_names: bool = True,
        classname_map: Mapping[str, str] | None = None,
        ignore: Iterable[str] = (),
        allow_outside_root: bool = False,
    ):
        self.root = os.fspath(root)
        require_dir(self.root, "image folder root")
        guard = ImageRoot(self.root, f"image folder {self.root!r}", allow_outside_root)
        ignore = set(ignore)
        folders = sorted(
            e.name
            for e in os.scandir(self.root)
            if e.is_dir() and not e.name.startswith(".") and e.name not in ignore
        )
        if not folders:
            raise ValueError(f"image folder root {self.root!r} has no class sub-folders")
        samples: list[Sample] = []
        classnames: list[str] = []
        for label, folder in enumerate(folders):
            if classname_map is not None and folder in classname_map:
                name = classname_map[folder]
            else:
                name = clean_classname(folder) if clean_names else folder
            files = list_images(os.path.join(self.root, folder), extensions, guard)
            if not files:
                raise ValueError(
                    f"class folder {folder!r} in {self.root!r} holds no images (extensions {', '.join(extensions)})"
                )
            classnames.append(name)
            samples.extend(Sample(f, label, name) for f in files)
        self.class_folders: list[str] = folders
        self.classnames: list[str] = classnames
        self.samples: list[Sample] = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    def __repr__(self) -> str:
        return f"ImageFolderSource({self.root!r}, classes={len(self.classnames)}, samples={len(self.samples)})"
