"""Safe file I/O: atomic writes and NIfTI reading that fails with the case and file named.

Every file medtriad writes goes through a temporary file in the target folder and ``os.replace``,
so an interrupted run never leaves a half-written JSON, CSV or NIfTI file behind (a reader sees the
old file or the new one). Every NIfTI file it reads goes through :func:`load_nifti`, which reads
the whole array up front so that truncated or corrupt files fail at load time with a
:class:`CaseFileError` instead of a nibabel/gzip/zlib traceback in the middle of training.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np

__all__ = [
    "CaseFileError",
    "atomic_write_bytes",
    "atomic_write_text",
    "write_json",
    "load_nifti",
    "save_nifti",
]


class CaseFileError(ValueError):
    """A file of a case is missing, unreadable or has unusable content.

    ``str(error)`` is ``"case CASE, file PATH: reason"`` so that a user can go straight to the file.
    """

    def __init__(self, case_id: str | None, path: str | os.PathLike, reason: str) -> None:
        self.case_id = case_id
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"case {case_id}, file {self.path}: {reason}")


_UMASK = os.umask(0)
os.umask(_UMASK)


def _temp_path(path: Path, suffix: str) -> Path:
    """Create (and close) an empty temporary file next to ``path``; same folder so os.replace is atomic.

    mkstemp makes it private (0600); give it the permissions an ordinary new file would get.
    """
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    os.chmod(name, 0o666 & ~_UMASK)
    return Path(name)


def _replace_atomically(path: Path, suffix: str, write) -> None:
    """Call ``write(temp_path)``, then move the temp file onto ``path`` and flush the folder entry (so that the rename
    itself survives a power cut); remove the temp on any failure."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_path(path, suffix)
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file, or a folder's entries, to disk. Folders are best effort: Windows cannot open one for this, and
    some file systems refuse to sync one."""
    path = Path(path)
    if path.is_dir():
        if os.name == "nt":
            return
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
        return
    with open(path, "rb+") as f:  # a writable handle: Windows' flush needs one
        os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: the old file stays intact if anything fails."""

    def write(temp: Path) -> None:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    _replace_atomically(Path(path), ".tmp", write)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike, compress: bool = False) -> None:
    """Copy ``src`` to ``dst`` atomically, byte for byte, or gzip-compressed when ``compress`` (an uncompressed
    ``.nii`` stored as ``.nii.gz``: the same bytes once decompressed)."""

    def write(temp: Path) -> None:
        with open(src, "rb") as source, open(temp, "wb") as raw:
            if compress:  # nibabel's level 1, no name or time in the gzip header: a source gives the same bytes
                with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=1, mtime=0) as packed:
                    shutil.copyfileobj(source, packed, 1 << 20)
            else:
                shutil.copyfileobj(source, raw, 1 << 20)
            raw.flush()
            os.fsync(raw.fileno())

    _replace_atomically(Path(dst), ".tmp", write)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as indented JSON (trailing newline) atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def load_nifti(path: str | os.PathLike, case_id: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read a 3D NIfTI image completely.

    Returns ``(data, affine)``: data (X, Y, Z) in the stored integer dtype, or float32 for float or
    scaled (scl_slope) data; affine (4, 4) float64 voxel -> world (mm). Trailing singleton
    dimensions (X, Y, Z, 1, ...) are squeezed. Raises :class:`CaseFileError` naming ``case_id``
    and ``path`` when the file is missing, corrupt, truncated or not 3D.
    """
    path = Path(path)
    if not path.is_file():
        raise CaseFileError(case_id, path, "file not found")
    try:
        image = nib.load(path)
        data = np.asanyarray(image.dataobj)
        affine = np.asarray(image.affine, dtype=np.float64)
    except Exception as error:  # nibabel, gzip, zlib, EOF and OS errors all mean "unreadable"
        raise CaseFileError(case_id, path, f"cannot read NIfTI ({type(error).__name__}: {error})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise CaseFileError(case_id, path, f"expected 3D data, got shape {tuple(data.shape)}")
    if data.dtype.kind == "f" and data.dtype != np.float32:
        data = data.astype(np.float32)
    return data, affine


AFFINE_ATOL = 1e-3  # mm: affines closer than this on every entry are the same grid


def grid_difference(shape: tuple[int, ...], affine: np.ndarray, reference: tuple[Path, tuple[int, ...], np.ndarray]
                    ) -> str | None:
    """How a file's grid (shape, affine) differs from ``reference`` (another file of the case: path, shape, affine),
    or None when they are the same grid: the words of the CaseFileError or check problem that reports it."""
    ref_path, ref_shape, ref_affine = reference
    if tuple(shape) != tuple(ref_shape):
        return f"shape {tuple(shape)} differs from {tuple(ref_shape)} of {Path(ref_path).name}"
    if not np.allclose(affine, ref_affine, atol=AFFINE_ATOL):
        return f"affine {affine.round(4).tolist()} differs from {ref_affine.round(4).tolist()} of {Path(ref_path).name}"
    return None


def same_grid(case_id: str | None, path: str | os.PathLike, shape: tuple[int, ...], affine: np.ndarray,
              reference: tuple[Path, tuple[int, ...], np.ndarray] | None) -> tuple[Path, tuple[int, ...], np.ndarray]:
    """A case's files share one grid: the file at ``path`` (its ``shape`` and ``affine``) is checked against
    ``reference`` (path, shape, affine of the case's first file) and :class:`CaseFileError` names it when it differs.
    Returns the reference, or this file's grid when there is none yet (the first file)."""
    if reference is None:
        return Path(path), tuple(shape), affine
    if (difference := grid_difference(shape, affine, reference)) is not None:
        raise CaseFileError(case_id, path, difference)
    return reference


def save_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    reference_header: nib.Nifti1Header | None = None,
) -> None:
    """Write ``array`` (X, Y, Z) with ``affine`` (4, 4) to ``path`` (.nii.gz or .nii) atomically.

    With ``reference_header`` (the header of the image the array was derived from) the output keeps
    its qform/sform codes and metadata, so viewers align it with the source; the data dtype is the
    array's own (bool is stored as uint8, since NIfTI has no bool type).
    """
    path = Path(path)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else ".nii" if path.name.endswith(".nii") else None
    if suffix is None:
        raise ValueError(f"NIfTI path must end with .nii.gz or .nii, got {str(path)!r}")
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    header = reference_header.copy() if reference_header is not None else nib.Nifti1Header()
    header.set_data_dtype(array.dtype)
    header.set_slope_inter(None, None)
    header["cal_min"], header["cal_max"] = 0, 0  # the source's display window would hide a 0-4 mask
    if reference_header is not None and np.allclose(affine, reference_header.get_best_affine(), atol=1e-6):
        # on the reference's own grid its header keeps its qform and sform as they are (a registration tool may have
        # left them different; each viewer reads the one it prefers): nibabel leaves a header alone whose best
        # affine is the image's
        image = nib.Nifti1Image(array, reference_header.get_best_affine(), header)
    else:  # another grid: both become ``affine``, with the reference's codes (sform "aligned" if it had neither)
        image = nib.Nifti1Image(array, affine, header)
        if reference_header is not None:
            q_code, s_code = int(reference_header["qform_code"]), int(reference_header["sform_code"])
            image.set_qform(affine, code=q_code)
            image.set_sform(affine, code=s_code or (0 if q_code else 2))

    def write(temp: Path) -> None:
        nib.save(image, temp)
        fsync_path(temp)

    _replace_atomically(path, suffix, write)
