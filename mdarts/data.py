"""Parallel text: Multi30k (task 1) and generic line-aligned corpora.

Multi30k files are named ``{split}.{lang}.gz`` (one sentence a line, gzip, aligned by
line across languages). The directory holding them comes from the ``data_dir`` argument
(``--data-dir``), else from ``$MDARTS_DATA``, else from a download cache
(``$MDARTS_CACHE/multi30k``, default ``~/.cache/mdarts/multi30k``) filled from the
Multi30k repository on first use.

Every reader accepts gzip (recognised by its magic bytes, whatever the file name) and
plain UTF-8 text. A file that cannot be read gives one line naming it: missing
(``FileNotFoundError``), a directory (``IsADirectoryError``), unreadable
(``PermissionError``), corrupt gzip data or a line that is not UTF-8 (``ValueError``); a
failed download raises :class:`DownloadError` and leaves the cache untouched.
"""

from __future__ import annotations

import gzip
import os
import sys
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Optional, Union

from .files import write_atomic

PathLike = Union[str, "os.PathLike[str]"]

MULTI30K_URL = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
"""Base URL of the raw Multi30k task-1 files (``{split}.{lang}.gz`` below it)."""

DOWNLOAD_TIMEOUT_S = 60.0
"""Seconds without an answer before a download attempt gives up."""

LANGUAGE_NAMES = {"en": "English", "de": "German", "fr": "French", "cs": "Czech"}

SPLIT_LANGUAGES: dict[str, tuple[str, ...]] = {
    "train": ("en", "de", "fr", "cs"),
    "val": ("en", "de", "fr", "cs"),
    "test_2016_flickr": ("en", "de", "fr", "cs"),
    "test_2017_flickr": ("en", "de", "fr"),
    "test_2017_mscoco": ("en", "de", "fr"),
}
"""Multi30k splits and the languages each one has."""

PAIRS = ("en-de", "de-en", "en-fr", "fr-en", "en-cs", "cs-en")
"""Translation directions of Multi30k, written ``source-target``."""

_GZIP_MAGIC = b"\x1f\x8b"


class DownloadError(RuntimeError):
    """The Multi30k files could not be fetched (typically: no network)."""


@dataclass
class ParallelCorpus:
    """Line-aligned sentence pairs: ``src[i]`` translates to ``tgt[i]``."""

    src_lang: str
    tgt_lang: str
    split: str
    src: list[str]
    tgt: list[str]

    def __len__(self) -> int:
        """Number of sentence pairs."""
        return len(self.src)


# ---------------------------------------------------------------------------- reading


def read_lines(path: PathLike) -> list[str]:
    """Read a text file (gzip or plain UTF-8) into one string per line.

    Line terminators (``\\n`` and a preceding ``\\r``) are removed; nothing else is.
    Lines are split on ``\\n`` only, so Unicode line separators inside a sentence stay
    inside it and line numbers match ``wc -l``.

    Raises (each naming the file):
        FileNotFoundError: the file does not exist.
        IsADirectoryError: the path is a directory.
        PermissionError: the file cannot be read.
        ValueError: corrupt gzip data, or a line that is not UTF-8 (names the line too).
    """
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path}: is a directory, not a text file")
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    raw = _read_bytes(path)
    lines = raw.split(b"\n")
    if lines[-1] == b"":
        lines.pop()
    return [_decode_line(line, path, number) for number, line in enumerate(lines, 1)]


def _read_bytes(path: Path) -> bytes:
    """Whole file contents, decompressed when the file starts with the gzip magic. Errors name
    ``path``: PermissionError when it may not be read, ValueError for another I/O error or for
    corrupt gzip data (truncated, a bad checksum, or deflate data that zlib rejects)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except PermissionError as error:
        raise PermissionError(f"{path}: cannot be read ({error.strerror})") from error
    except OSError as error:  # an I/O error of the disk or file system
        raise ValueError(f"{path}: cannot be read ({error.strerror or error})") from error
    if not data.startswith(_GZIP_MAGIC):
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: corrupt gzip data ({error})") from error


def _decode_line(line: bytes, path: Path, number: int) -> str:
    """One line as text without its ``\\r``; ``number`` (1-based) is for the error."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        bad = line[error.start : error.start + 1].hex()
        raise ValueError(
            f"{path}: line {number} is not valid UTF-8 (byte 0x{bad} at byte offset {error.start} of the line)"
        ) from error
    return text[:-1] if text.endswith("\r") else text


def load_parallel_files(
    src_path: PathLike, tgt_path: PathLike, src_lang: str = "src", tgt_lang: str = "tgt", split: str = "custom"
) -> ParallelCorpus:
    """Load a generic parallel corpus from two line-aligned files (gzip or plain).

    Raises:
        FileNotFoundError: a file is missing (names it and which side was expected).
        ValueError: the files have different line counts (names both files and both
            counts), the corpus is empty, or a line is not UTF-8 (names file and line).
    """
    src_path, tgt_path = Path(src_path), Path(tgt_path)
    for side, lang, path in (("source", src_lang, src_path), ("target", tgt_lang, tgt_path)):
        if path.is_dir():
            raise IsADirectoryError(f"{side} file {path}: is a directory (expected the {lang} side of split {split!r})")
        if not path.is_file():
            raise FileNotFoundError(f"{side} file not found: {path} (expected the {lang} side of split {split!r})")
    src, tgt = read_lines(src_path), read_lines(tgt_path)
    if len(src) != len(tgt):
        raise ValueError(
            f"source and target differ in length: {src_path} has {len(src)} lines, {tgt_path} has {len(tgt)} lines"
        )
    if not src:
        raise ValueError(f"empty corpus: {src_path} and {tgt_path} have no lines")
    return ParallelCorpus(src_lang, tgt_lang, split, src, tgt)


# ---------------------------------------------------------------------------- Multi30k


def parse_pair(pair: str) -> tuple[str, str]:
    """``"en-de"`` -> ``("en", "de")``; raises ValueError listing the known pairs."""
    if pair not in PAIRS:
        raise ValueError(f"unknown language pair {pair!r}; Multi30k has: {', '.join(PAIRS)}")
    src_lang, tgt_lang = pair.split("-")
    return src_lang, tgt_lang


def splits_for_pair(pair: str) -> list[str]:
    """The Multi30k splits that have both languages of ``pair``, in canonical order."""
    src_lang, tgt_lang = parse_pair(pair)
    return [s for s, langs in SPLIT_LANGUAGES.items() if src_lang in langs and tgt_lang in langs]


def multi30k_file_name(split: str, lang: str) -> str:
    """File name of one side of one split, as in the Multi30k repository."""
    return f"{split}.{lang}.gz"


def cache_root() -> Path:
    """Root of mdarts' caches: ``$MDARTS_CACHE``, default ``~/.cache/mdarts``."""
    return Path(os.environ.get("MDARTS_CACHE") or "~/.cache/mdarts").expanduser()


def multi30k_cache_dir() -> Path:
    """Download cache: ``$MDARTS_CACHE/multi30k``, default ``~/.cache/mdarts/multi30k``."""
    return cache_root() / "multi30k"


def load_pair(
    pair: str, split: str, data_dir: Optional[PathLike] = None, *, base_url: str = MULTI30K_URL
) -> ParallelCorpus:
    """Load one split of Multi30k in one translation direction.

    Args:
        pair: ``"en-de"``, ``"de-en"``, ``"en-fr"``, ``"fr-en"``, ``"en-cs"`` or
            ``"cs-en"``; the reverse direction swaps source and target.
        split: ``train``, ``val``, ``test_2016_flickr``, ``test_2017_flickr`` or
            ``test_2017_mscoco`` (Czech has only the first three).
        data_dir: directory with the raw files; when None, ``$MDARTS_DATA``; when that
            is unset too, the download cache (files missing there are downloaded from
            ``base_url``, with a message on stderr).

    Raises:
        ValueError: unknown pair, or a split the pair does not have (lists those it has).
        FileNotFoundError: the data directory or a file in it is missing.
        NotADirectoryError: the data directory is a file.
        DownloadError: a needed file is not cached and cannot be downloaded.
    """
    src_lang, tgt_lang = parse_pair(pair)
    src_path, tgt_path = multi30k_files(pair, split, data_dir, base_url=base_url)
    return load_parallel_files(src_path, tgt_path, src_lang, tgt_lang, split)


def multi30k_files(
    pair: str, split: str, data_dir: Optional[PathLike] = None, *, base_url: str = MULTI30K_URL
) -> tuple[Path, Path]:
    """The source and target files of one split of Multi30k in one direction (downloaded into the
    cache when there is no data directory), checked to exist; raises as :func:`load_pair`."""
    src_lang, tgt_lang = parse_pair(pair)
    available = splits_for_pair(pair)
    if split not in available:
        raise ValueError(f"Multi30k has no split {split!r} for {pair}; it has: {', '.join(available)}")
    directory = resolve_data_dir(data_dir)
    if directory is not None and not directory.is_dir():
        origin = "--data-dir" if data_dir is not None else "MDARTS_DATA"
        if directory.exists():
            raise NotADirectoryError(
                f"{origin} {directory}: is a file, not a directory (expected the folder holding {split}.{src_lang}.gz)"
            )
        raise FileNotFoundError(f"Multi30k data directory not found: {directory} (from {origin})")
    if directory is None:
        directory = multi30k_cache_dir()
        for lang in (src_lang, tgt_lang):
            ensure_downloaded(multi30k_file_name(split, lang), directory, base_url)
    return _multi30k_path(directory, split, src_lang), _multi30k_path(directory, split, tgt_lang)


def resolve_data_dir(data_dir: Optional[PathLike]) -> Optional[Path]:
    """The Multi30k folder: the argument (``--data-dir``), else ``$MDARTS_DATA``, else None
    (meaning: use the download cache); ``~`` expanded. The only place that reads
    ``$MDARTS_DATA``."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    env = os.environ.get("MDARTS_DATA")
    return Path(env).expanduser() if env else None


def _multi30k_path(directory: Path, split: str, lang: str) -> Path:
    """``{split}.{lang}.gz`` in ``directory``, or the uncompressed ``{split}.{lang}``.

    Raises FileNotFoundError naming the expected path when neither exists.
    """
    gz_path = directory / multi30k_file_name(split, lang)
    if gz_path.is_file():
        return gz_path
    plain_path = directory / f"{split}.{lang}"
    if plain_path.is_file():
        return plain_path
    raise FileNotFoundError(
        f"missing file {gz_path}: expected the {LANGUAGE_NAMES[lang]} ({lang}) side of "
        f"Multi30k split {split!r} (or its uncompressed form {plain_path.name})"
    )


# ---------------------------------------------------------------------------- download


def ensure_downloaded(
    file_name: str, cache_dir: PathLike, base_url: str = MULTI30K_URL, timeout: float = DOWNLOAD_TIMEOUT_S
) -> Path:
    """Path of ``file_name`` in ``cache_dir``, downloading ``base_url + file_name`` if absent.

    The download goes to a temporary file in ``cache_dir``, is checked to be complete
    gzip data, and only then renamed to its final name, so an interrupted or failed
    download never leaves a partial file in the cache.

    Raises:
        DownloadError: no network, an HTTP error, a timeout, or a corrupt download.
    """
    cache_dir = Path(cache_dir)
    target = cache_dir / file_name
    if target.is_file():
        return target
    url = base_url.rstrip("/") + "/" + file_name
    print(f"mdarts: downloading {url} -> {target}", file=sys.stderr)

    def download(out: BinaryIO) -> None:
        _copy_url(url, out, timeout)
        out.flush()
        _check_gzip(Path(out.name), url)

    return write_atomic(target, download)


def _copy_url(url: str, out: BinaryIO, timeout: float, chunk_bytes: int = 1 << 16) -> None:
    """Stream the body of ``url`` into the binary file ``out``."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            while chunk := response.read(chunk_bytes):
                out.write(chunk)
    except OSError as error:  # URLError, HTTPError, socket timeouts are all OSError
        raise DownloadError(
            f"could not download {url}: {getattr(error, 'reason', error)}. "
            "Without network access, pass --data-dir DIR or set MDARTS_DATA=DIR to a "
            "directory holding the Multi30k raw files ({split}.{lang}.gz)."
        ) from error


def _check_gzip(path: Path, url: str) -> None:
    """Raise DownloadError unless ``path`` holds complete gzip data."""
    try:
        with gzip.open(path, "rb") as handle:
            while handle.read(1 << 20):
                pass
    except (OSError, EOFError) as error:
        raise DownloadError(f"download of {url} is not valid gzip data ({error})") from error
