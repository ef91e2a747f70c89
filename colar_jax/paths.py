"""User paths that keep ``gs://``: the one path type of workdirs, data dirs and sources,
model dirs, ``init_from``, eval output and export dirs.

``etils.epath.Path`` (what Orbax uses) reads and writes local files and ``gs://`` /
``s3://`` URLs alike. ``os.path.abspath`` / ``normpath`` / ``pathlib`` would turn
``gs://bucket/run`` into ``<cwd>/gs:/bucket/run``; :func:`absolute` and :func:`normalize`
leave a URL's scheme alone. Paths travel as ``str`` (configs, checkpoint metadata, JSON);
these helpers take and give strings. This module imports nothing of colar_jax, so every
layer may use it.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import tempfile
from collections.abc import Iterator
from typing import Any

from etils import epath

URL_SCHEMES = ("gs://", "s3://", "az://", "hf://")
PathLike = str | os.PathLike


def is_url(p: PathLike) -> bool:
  return os.fspath(p).startswith(URL_SCHEMES)


def is_local(p: PathLike) -> bool:
  return not is_url(p)


def path(p: PathLike) -> epath.Path:
  return epath.Path(p)


def _split(p: str) -> tuple[str, str]:
  """(scheme with ``://`` or "", the rest)."""
  for s in URL_SCHEMES:
    if p.startswith(s):
      return s, p[len(s) :]
  return "", p


def normalize(p: PathLike) -> str:
  """``a/./b/../c`` -> ``a/c``; a URL keeps its scheme (``os.path.normpath`` would not)."""
  scheme, rest = _split(os.fspath(p))
  if scheme:
    return scheme + posixpath.normpath(rest).lstrip("/")
  return os.path.normpath(rest)


def absolute(p: PathLike) -> str:
  """An absolute path (``~`` expanded) for a local path; a URL as it is."""
  p = os.fspath(p)
  if is_url(p):
    return normalize(p)
  return os.path.abspath(os.path.expanduser(p))


def join(p: PathLike, *parts: str) -> str:
  return str(epath.Path(p).joinpath(*parts))


def parent(p: PathLike) -> str:
  return str(epath.Path(absolute(p)).parent)


def relative(p: PathLike, start: PathLike) -> str | None:
  """``p`` relative to the directory ``start`` (``../cot``), None when one is a URL and
  the other is not, or they are on different buckets."""
  a, b = absolute(p), absolute(start)
  (sa, ra), (sb, rb) = _split(a), _split(b)
  if sa != sb:
    return None
  if sa:
    ba, bb = ra.split("/", 1)[0], rb.split("/", 1)[0]
    if ba != bb:
      return None
    return posixpath.relpath("/" + ra, "/" + rb)
  return os.path.relpath(a, b)


def resolve_relative(rel: str, start: PathLike) -> str:
  """The path ``rel`` (from :func:`relative`) names from the directory ``start``."""
  return normalize(join(absolute(start), rel))


def exists(p: PathLike) -> bool:
  return epath.Path(p).exists()


def is_dir(p: PathLike) -> bool:
  return epath.Path(p).is_dir()


def is_file(p: PathLike) -> bool:
  return epath.Path(p).is_file()


def listdir(p: PathLike) -> list[str]:
  """Names in a directory (``[]`` if it is missing or unreadable)."""
  try:
    return sorted(c.name for c in epath.Path(p).iterdir())
  except OSError:
    return []


def makedirs(p: PathLike) -> None:
  epath.Path(p).mkdir(parents=True, exist_ok=True)


def read_text(p: PathLike) -> str:
  return epath.Path(p).read_text()


def write_text(p: PathLike, text: str) -> None:
  """Local: written to ``<p>.tmp`` then renamed over ``p`` (atomic). A URL: one object
  write (object stores have no partial objects)."""
  write_bytes(p, text.encode())


def write_bytes(p: PathLike, data: bytes) -> None:
  """:func:`write_text` for bytes (a plot's PNG)."""
  p = os.fspath(p)
  if is_url(p):
    epath.Path(p).write_bytes(data)
    return
  tmp = p + ".tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, p)


def append_line(p: PathLike, line: str) -> None:
  """Appends one line; a URL (no append on object stores) is read and rewritten."""
  p = os.fspath(p)
  if is_url(p):
    old = read_text(p) if exists(p) else ""
    epath.Path(p).write_text(old + line + "\n")
    return
  with open(p, "a") as f:
    f.write(line + "\n")


def walk_files(p: PathLike) -> Iterator[tuple[str, str]]:
  """(relative name, full path) of every file under a directory, sorted."""
  root = epath.Path(p)
  top = str(root).rstrip("/") + "/"
  for d, _dirs, files in sorted(root.walk(), key=lambda x: str(x[0])):
    for f in sorted(files):
      full = str(epath.Path(d) / f)
      assert full.startswith(top), (full, top)
      yield full[len(top) :], full


def copy_dir(src: PathLike, dst: PathLike) -> None:
  """Copies every file under ``src`` to the same names under ``dst`` (either a URL;
  read whole: for small files)."""
  for rel, full in walk_files(src):
    out = epath.Path(dst) / rel
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(epath.Path(full).read_bytes())


def local_copy(p: PathLike) -> str:
  """A local directory with the files of ``p``: ``p`` itself when local; a URL's files
  copied once per process into a temporary directory (for libraries that read local
  files only: ``transformers`` tokenizers)."""
  p = os.fspath(p)
  if is_local(p):
    return p
  key = hashlib.sha256(normalize(p).encode()).hexdigest()[:16]
  if key not in _LOCAL_COPIES:
    out = tempfile.mkdtemp(prefix=f"colar_jax_{key}_")
    copy_dir(p, out)
    _LOCAL_COPIES[key] = out
  return _LOCAL_COPIES[key]


_LOCAL_COPIES: dict[str, str] = {}

SMALL_FILE = 1 << 20  # files up to this size are fingerprinted by content


def fingerprint(p: PathLike) -> str:
  """A content fingerprint of a directory of weights: sha256 over every file's relative
  name and size, and the bytes of each file up to 1 MiB (configs, Orbax's
  ``_METADATA`` and OCDBT manifests, whose array file names are random per write).
  Cheap on a 100M-parameter model: the array files are only sized."""
  h = hashlib.sha256()
  for rel, full in walk_files(p):
    size = epath.Path(full).stat().length
    h.update(f"{rel}\0{size}\0".encode())
    if size <= SMALL_FILE:
      h.update(epath.Path(full).read_bytes())
  return "sha256:" + h.hexdigest()[:32]


def pointer(target: PathLike, start: PathLike, *, fingerprinted: bool = True) -> dict[str, Any]:
  """What finds ``target`` again after a move: its absolute path, its path relative to
  the directory ``start`` and (``fingerprinted``) its content fingerprint."""
  out: dict[str, Any] = dict(path=absolute(target), rel=relative(target, start))
  if fingerprinted:
    out["fingerprint"] = fingerprint(target)
  return out
