"""A restricted unpickler for the "python version" of CIFAR-10/100.

`pickle.load` runs whatever callables a file names, so a crafted data file could run code.
`load` reads the CIFAR format and nothing more. Format (https://www.cs.toronto.edu/~kriz/cifar.html):
each batch file is a Python 2 pickle (protocol 2) of a dict with
  'data'                                  numpy uint8 array, N x 3072 (1024 R, 1024 G, 1024 B; 32x32 row-major),
  'labels' or 'fine_labels'/'coarse_labels'  lists of ints,
  'batch_label'                           a string, 'filenames' a list of strings
(plus 'batches.meta'/'meta': lists of strings and ints). Dicts, lists, tuples, str/bytes, ints, floats,
bool and None are pickle opcodes and never go through `find_class`. The only globals such a file
names are numpy's array machinery, which `find_class` maps to checked wrappers:

  numpy.core.multiarray._reconstruct / numpy._core.multiarray._reconstruct  (first argument must be
      numpy.ndarray, then shape (0,) and type code 'b', exactly as numpy writes them)
  numpy.ndarray     a token only _reconstruct accepts; it cannot be called
  numpy.dtype       numeric kinds only (bool, int, uint, float, complex): no object, structured or
                    sub-array dtypes; always a fresh copy, never numpy's shared instance
  numpy.core.multiarray.scalar / numpy._core.multiarray.scalar   (dtype, bytes) -> numpy scalar
Also, so the same dict re-pickled by Python 3 loads too:
  numpy.core.numeric._frombuffer / numpy._core.numeric._frombuffer  (protocol 5 arrays, in-band only)
  _codecs.encode(str, 'latin1')  and  __builtin__.bytes() / builtins.bytes()   (how protocols 0-2
      write bytes; only these exact arguments).
Any other global raises `UnsafePickleError("refused global module.name (...)")`, as do persistent ids and the copyreg
extension opcodes (EXT1/2/4, whose cache would bypass `find_class`).

Why that is enough: a pickle can only call what `find_class` returns, and BUILD calls the
`__setstate__` of the object on the stack. BUILD is allowed only on ndarrays and dtypes. A dtype's
state is checked to equal the state numpy itself writes for that dtype (only the byte order may
differ): a crafted state could otherwise set flags such as "holds object pointers" on a uint8
dtype and make numpy treat raw bytes as pointers. With object dtypes refused and dtype states
checked, `ndarray.__setstate__` only copies bytes into a numeric array of a size numpy checks.
Object-dtype arrays are refused outright even when they would hold plain values: CIFAR has none.

BUILD needs a hook, so this subclasses the pure-Python `pickle._Unpickler` (the C unpickler's
opcodes cannot be overridden); a CIFAR batch is a few tens of thousands of opcodes, so it reads
as fast as `pickle.load` (10000-image batch, 31 MB: 0.065 s against 0.062 s).

Errors: a refused file raises `UnsafePickleError` (a `pickle.UnpicklingError`); a truncated or
otherwise malformed file raises `pickle.UnpicklingError` (never EOFError); I/O errors stay OSError.
"""

from __future__ import annotations

import os
import pickle

import numpy as np

try:  # numpy >= 1.26 has numpy._core; numpy 2 deprecates numpy.core
    from numpy._core.multiarray import _reconstruct as _np_reconstruct, scalar as _np_scalar
except ImportError:  # pragma: no cover
    from numpy.core.multiarray import _reconstruct as _np_reconstruct, scalar as _np_scalar

__all__ = ["UnsafePickleError", "load"]


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle names something outside the CIFAR allow-list (see the module docstring)."""


def _refuse(what: str):
    what = what.replace("\n", "\\n").replace("\r", "\\r")  # one line, and short: `what` comes from the file
    raise UnsafePickleError(f"refused {what if len(what) <= 200 else what[:200] + '...'} "
                            f"(only CIFAR's numpy arrays are allowed)")


class _NdarrayToken:
    """Stands for numpy.ndarray, which CIFAR pickles only name as _reconstruct's first argument."""

    def __call__(self, *args, **kwargs):
        _refuse("call of numpy.ndarray")

    def __repr__(self):
        return "numpy.ndarray"


_NDARRAY = _NdarrayToken()
_DTYPE_KINDS = "biufc"


def _check_dtype(d):
    if not isinstance(d, np.dtype):
        _refuse(f"dtype argument {type(d).__name__}")
    return d


def _dtype(obj, align=False, copy=True):
    # obj is a type string ('u1') or, from crafted files, anything the stream can hold: the
    # result is checked, not obj. copy=True always, so BUILD can never touch numpy's singletons.
    d = np.dtype(obj, copy=True)
    if d.kind not in _DTYPE_KINDS or d.hasobject or d.fields is not None or d.subdtype is not None:
        _refuse(f"numpy.dtype({obj!r})")
    return d


def _reconstruct(subtype, shape, typecode):
    # numpy writes _reconstruct(ndarray, (0,), b'b'): an empty array that BUILD then fills. A
    # different first argument would be an ndarray subclass whose hooks run on construction.
    if subtype is not _NDARRAY:
        _refuse(f"_reconstruct first argument {subtype!r}")
    if shape != (0,) or typecode not in (b"b", "b"):
        _refuse(f"_reconstruct arguments {shape!r}, {typecode!r}")
    return _np_reconstruct(np.ndarray, (0,), b"b")


def _scalar(dtype, obj):
    if not isinstance(obj, (bytes, str)):
        _refuse(f"scalar value {type(obj).__name__}")
    return _np_scalar(_check_dtype(dtype), obj)


def _frombuffer(buf, dtype, shape, order):
    # numpy's own _frombuffer is this line; buf is bytes/bytearray (out-of-band buffers are refused
    # by the unpickler itself since load passes no `buffers`).
    if not isinstance(buf, (bytes, bytearray)) or order not in ("C", "F"):
        _refuse(f"_frombuffer arguments {type(buf).__name__}, {order!r}")
    return np.frombuffer(buf, dtype=_check_dtype(dtype)).reshape(shape, order=order)


def _codecs_encode(obj, encoding="utf-8", errors="strict"):
    if not isinstance(obj, str) or encoding != "latin1" or errors != "strict":
        _refuse(f"_codecs.encode arguments {type(obj).__name__}, {encoding!r}")
    return obj.encode("latin1")


def _bytes(*args):
    if args:
        _refuse("bytes() with arguments")
    return b""


_ALLOWED = {
    **{(m, "_reconstruct"): _reconstruct for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _scalar for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "_frombuffer"): _frombuffer for m in ("numpy.core.numeric", "numpy._core.numeric")},
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _dtype,
    ("_codecs", "encode"): _codecs_encode,
    ("__builtin__", "bytes"): _bytes,
    ("builtins", "bytes"): _bytes,
}


def _check_dtype_state(d: np.dtype, state) -> tuple:
    """The state numpy writes for d, byte order aside; str or bytes (encoding='bytes')."""
    if isinstance(state, tuple) and len(state) > 1 and isinstance(state[1], bytes):
        state = (state[0], state[1].decode("latin1")) + state[2:]
    own = d.__reduce__()[2]
    if not (isinstance(state, tuple) and len(state) == len(own) and state[0] == own[0]
            and state[1] in ("<", ">", "|", "=") and state[2:] == own[2:]):
        _refuse(f"dtype state {state!r} for {d}")
    return state


class _Unpickler(pickle._Unpickler):
    dispatch = pickle._Unpickler.dispatch.copy()

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED:
            _refuse(f"global {module}.{name}")
        return _ALLOWED[module, name]

    def persistent_load(self, pid):
        _refuse(f"persistent id {pid!r}")

    def get_extension(self, code):  # EXT1/2/4: the copyreg cache would skip find_class
        _refuse(f"extension code {code}")

    def load_build(self):
        inst, state = self.stack[-2], self.stack[-1]
        if isinstance(inst, np.dtype):
            self.stack[-1] = _check_dtype_state(inst, state)
        elif type(inst) is not np.ndarray:
            _refuse(f"BUILD on {type(inst).__name__}")
        super().load_build()

    dispatch[pickle.BUILD[0]] = load_build


class _ExactReader:
    """A file whose short reads raise, so truncation is one UnpicklingError whatever the opcode."""

    def __init__(self, f):
        self._f = f

    def read(self, n=-1):
        data = self._f.read(n)
        if n is not None and n >= 0 and len(data) < n:
            raise pickle.UnpicklingError("pickle data was truncated")
        return data

    def readline(self):
        line = self._f.readline()
        if not line.endswith(b"\n"):
            raise pickle.UnpicklingError("pickle data was truncated")
        return line


def load(file_or_path, *, encoding: str = "latin1"):
    """Unpickle a CIFAR "python version" file (a path or a binary file object) safely.

    encoding: how Python 2 strings are decoded, as for `pickle.load` ("latin1" as torchvision
    does, or "bytes" as the CIFAR page does). Raises UnsafePickleError for anything outside the
    allow-list, pickle.UnpicklingError for truncated/malformed data, OSError for I/O errors.
    """
    if isinstance(file_or_path, (str, bytes, os.PathLike)):
        with open(file_or_path, "rb") as f:
            return load(f, encoding=encoding)
    try:
        return _Unpickler(_ExactReader(file_or_path), encoding=encoding).load()
    except (pickle.UnpicklingError, OSError, MemoryError):
        raise
    except Exception as e:  # IndexError on a bad stack, ValueError from numpy, ...: all "malformed"
        raise pickle.UnpicklingError(f"malformed pickle ({type(e).__name__}: {e})") from e
