"""A restricted pickle loader for data files that ship as pickles (the revisited
Oxford/Paris ground truth ``gnd_*.pkl``).

``pickle.load`` runs whatever callables the file names (a pickle can call
``os.system``). :func:`load` admits only plain data: ``None``, booleans,
numbers, strings, bytes, lists, tuples, dicts, sets, and numpy arrays, dtypes
and scalars. Any other global the file refers to is refused with an
:class:`~mom.errors.InputError` before it is called.
"""
from __future__ import annotations

import _compat_pickle
import codecs
import io
import os
import pickle
from pathlib import Path

import numpy as np
from numpy._core import multiarray

from mom.errors import InputError


def _latin1_encode(text: str, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles use it for bytes: text codecs only."""
    if codecs.lookup(encoding).name not in ("latin-1", "iso8859-1", "utf-8", "ascii"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with codec {encoding!r}")
    return codecs.encode(text, encoding, errors)


def _frombuffer(buffer, dtype, shape, order):
    """numpy's protocol-5 array constructor, refusing object arrays (raw memory)."""
    dtype = np.dtype(dtype)
    if dtype.hasobject:
        raise pickle.UnpicklingError("refusing an object array built from raw memory")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy()


def _allowed_globals() -> dict[tuple[str, str], object]:
    allowed = {
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "bytes"): bytes,
        ("_codecs", "encode"): _latin1_encode,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    # numpy < 2 pickles name numpy.core.*, numpy >= 2 pickles numpy._core.*.
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = _frombuffer  # protocol 5
    # Concrete dtype classes (numpy.dtypes.Int64DType, ...) appear in some pickles.
    for name in dir(np.dtypes):
        if name.endswith("DType") and name != "StringDType":
            allowed[("numpy.dtypes", name)] = getattr(np.dtypes, name)
    return allowed


_ALLOWED = _allowed_globals()


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        # Python 2 names (__builtin__.set), as pickle's own find_class maps them.
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load {module}.{name}: only plain containers, numbers, strings and "
                "numpy arrays are allowed"
            ) from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("refusing persistent references")


def loads(data: bytes, where: str = "pickle"):
    """Unpickle ``data`` with the restrictions of this module."""
    try:
        return _RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as error:
        raise InputError(f"{where}: {error}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, ImportError) as error:
        raise InputError(f"{where}: not a readable pickle of plain data ({type(error).__name__}: {error})") from None


def load(path: str | os.PathLike):
    """Unpickle the file at ``path`` (plain data only, see the module doc)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: file not found")
    return loads(path.read_bytes(), where=str(path))
