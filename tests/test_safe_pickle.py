"""bench/safe_pickle.py: CIFAR's pickles load exactly as pickle.load reads them; anything that could
run code is refused before it runs (each payload is first shown to work under plain pickle)."""

from __future__ import annotations

import builtins
import codecs
import copyreg
import io
import operator
import os
import pickle
import struct
import subprocess

import numpy as np
import pytest

from bench import safe_pickle
from bench.safe_pickle import UnsafePickleError
from helpers import Py2Pickler


def _dumps(obj, writer) -> bytes:
    buf = io.BytesIO()
    if writer == "py2":
        Py2Pickler(buf, protocol=2).dump(obj)
        # numpy 1.x (which wrote the CIFAR files) names numpy.core, numpy 2 numpy._core; GLOBAL is a text line
        return buf.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")
    pickle.dump(obj, buf, protocol=writer)
    return buf.getvalue()


def _cifar10_batch(rng, n=7):
    return {b"batch_label": b"training batch 1 of 5", b"labels": rng.integers(0, 10, n).tolist(),
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"filenames": [f"img_{i}.png".encode() for i in range(n)]}


def _cifar100_batch(rng, n=5):
    fine = rng.integers(0, 100, n).tolist()
    return {b"filenames": [f"train_{i}.png".encode() for i in range(n)], b"batch_label": b"train",
            b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine],
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)}


def _extras(rng, n=4):
    """Not in CIFAR, but in the allow-list: other numeric dtypes and byte orders, numpy scalars, a view."""
    return {"labels": np.arange(n, dtype=">i4"), "x": rng.standard_normal((n, 3)).astype(np.float32),
            "fortran": np.asfortranarray(np.arange(6, dtype=np.int64).reshape(2, 3)), "mask": np.ones(n, bool),
            "n": np.int64(3), "f": np.float32(1.5), "z": np.complex128(1 - 2j), "empty": b"", "t": (1, None)}


def _assert_same(a, b):
    assert type(a) is type(b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.dtype.byteorder == b.dtype.byteorder and a.shape == b.shape
        assert a.flags.f_contiguous == b.flags.f_contiguous
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _assert_same(x, y)
    else:
        assert a == b and (not isinstance(a, np.generic) or a.dtype == b.dtype)


# ----------------------------------------------------------------------------------------------
# The real format loads identically


@pytest.mark.parametrize("encoding", ["latin1", "bytes"])
@pytest.mark.parametrize("writer", ["py2", 0, 2, 4, 5])
@pytest.mark.parametrize("make", [_cifar10_batch, _cifar100_batch, _extras])
def test_loads_like_pickle(tmp_path, make, writer, encoding):
    obj = make(np.random.default_rng(0))
    path = tmp_path / "batch"
    path.write_bytes(_dumps(obj, writer))
    with open(path, "rb") as f:
        want = pickle.load(f, encoding=encoding)
    got = safe_pickle.load(path, encoding=encoding)  # a path ...
    _assert_same(got, want)
    with open(path, "rb") as f:  # ... or a file object
        _assert_same(safe_pickle.load(f, encoding=encoding), want)
    if writer == "py2" and make is _cifar10_batch:  # the CIFAR page's encoding='bytes' vs torchvision's 'latin1'
        key = b"data" if encoding == "bytes" else "data"
        assert got[key].dtype == np.uint8 and got[key].shape == (7, 3072)


def test_the_fixture_writes_what_cifar_files_hold():
    """The globals a Python 2 CIFAR pickle names, as in the real archives."""
    data = _dumps(_cifar10_batch(np.random.default_rng(1)), "py2")
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in data and b"cnumpy\nndarray\n" in data
    assert b"cnumpy\ndtype\n" in data and b"_codecs" not in data


def test_hand_assembled_python2_batch():
    """Written by hand as numpy 1.x on Python 2 lays out cifar-10-batches-py/data_batch_* (here N=2)."""
    raw = bytes(range(256)) * 24  # 2 x 3072
    data = (b"\x80\x02}q\x01(U\x04dataq\x02cnumpy.core.multiarray\n_reconstruct\nq\x03cnumpy\nndarray\nq\x04"
            b"K\x00\x85U\x01b\x87Rq\x05(K\x01K\x02M\x00\x0c\x86cnumpy\ndtype\nq\x06U\x02u1K\x00K\x01\x87Rq\x07"
            b"(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb\x89T" + struct.pack("<i", len(raw)) + raw +
            b"tbU\x06labelsq\x08]q\t(K\x06K\teU\x0bbatch_labelq\nU\x15training batch 1 of 5q\x0b"
            b"U\tfilenamesq\x0c]q\r(U\x05a.pngq\x0eU\x05b.pngq\x0feu.")
    for encoding in ("latin1", "bytes"):
        want = pickle.loads(data, encoding=encoding)
        got = safe_pickle.load(io.BytesIO(data), encoding=encoding)
        _assert_same(got, want)
    assert got[b"data"].dtype == np.uint8 and got[b"data"].shape == (2, 3072) and got[b"labels"] == [6, 9]
    np.testing.assert_array_equal(got[b"data"].ravel(), np.frombuffer(raw, np.uint8))


# ----------------------------------------------------------------------------------------------
# Code execution is refused


class _Call:
    """Pickles as `func(*args)`; func may itself be a _Call (nested calls)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __call__(self, *args):  # pickle insists that the reduce callable be callable
        raise AssertionError

    def __reduce__(self):
        return self.func, self.args


class _EvilArray(np.ndarray):
    """An ndarray subclass whose construction hook writes a file: numpy's _reconstruct would call it."""

    target = None

    def __array_finalize__(self, obj):
        if _EvilArray.target:
            open(_EvilArray.target, "w").close()


def _evil_array():
    return np.zeros(3, np.uint8).view(_EvilArray)


def _payloads():
    t = "{target}"
    return {
        "os.system": _Call(os.system, f"touch {t}"),
        "builtins.open": _Call(builtins.open, t, "w"),
        "subprocess.call": _Call(subprocess.call, ["touch", t]),
        "subprocess.run": _Call(subprocess.run, ["touch", t]),
        "builtins.eval": _Call(builtins.eval, f"open({t!r}, 'w').close()"),
        "builtins.exec": _Call(builtins.exec, f"import os; os.system('touch {t}')"),
        "operator.attrgetter": _Call(_Call(operator.attrgetter("system"), _Call(builtins.__import__, "os")),
                                     f"touch {t}"),
        "getattr(__import__)": _Call(_Call(builtins.getattr, _Call(builtins.__import__, "os"), "system"),
                                     f"touch {t}"),
        "inside a valid dict's data": {"batch_label": "x", "labels": [1, 2], "filenames": ["a.png", "b.png"],
                                       "data": _Call(os.system, f"touch {t}")},
        "_reconstruct(ndarray subclass)": {"data": _evil_array(), "labels": [0, 1, 2]},
    }


def _materialise(obj, target: str):
    """Replace the {target} placeholder (payloads are built before the path exists)."""
    if isinstance(obj, str):
        return obj.replace("{target}", target)
    if isinstance(obj, _Call):
        return _Call(_materialise(obj.func, target), *(_materialise(a, target) for a in obj.args))
    if isinstance(obj, dict):
        return {k: _materialise(v, target) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_materialise(v, target) for v in obj]
    return obj


@pytest.mark.parametrize("writer", ["py2", 2, 5])
@pytest.mark.parametrize("name", list(_payloads()))
def test_code_execution_is_refused(tmp_path, name, writer):
    target = tmp_path / "pwned"
    data = _dumps(_materialise(_payloads()[name], str(target)), writer)
    # the payload is live: plain pickle creates the file
    _EvilArray.target = str(target)
    try:
        try:
            pickle.loads(data)
        except Exception:
            pass  # eval/exec/open return values that later fail; the file is what matters
    finally:
        _EvilArray.target = None
    assert target.exists(), f"payload {name} does not work under plain pickle; the test proves nothing"
    target.unlink()
    _EvilArray.target = str(target)
    try:
        with pytest.raises(UnsafePickleError, match=r"^refused global \S+\.\S+ ") as e:
            safe_pickle.load(io.BytesIO(data))
    finally:
        _EvilArray.target = None
    assert not target.exists()
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("writer", ["py2", 2, 5])
def test_refused_global_is_named(writer):
    for func, shown in ((os.system, f"{os.system.__module__}.system"), (builtins.eval, "builtins.eval"),
                        (_evil_array().__reduce__()[1][0], f"{__name__}._EvilArray")):
        with pytest.raises(UnsafePickleError) as e:
            safe_pickle.load(io.BytesIO(_dumps(_Call(func, "x"), writer)))
        shown = shown.replace("builtins.", "__builtin__.") if writer != 5 else shown
        assert str(e.value).startswith(f"refused global {shown} (")


_np_scalar = np.int64(0).__reduce__()[0]
_np_frombuffer = np.zeros(1).__reduce_ex__(5)[0]


def _reconstruct_call(first, shape=(0,), code=b"b"):
    """_reconstruct(first, shape, code) as numpy would pickle it, with crafted arguments."""
    return _Call(np.ndarray.__reduce__(np.zeros(0))[0], first, shape, code)


@pytest.mark.parametrize("payload, refusal", [
    pytest.param(_reconstruct_call(np.dtype), "_reconstruct first argument", id="reconstruct-of-dtype"),
    pytest.param(_reconstruct_call(np.ndarray, (10 ** 12,)), "_reconstruct arguments", id="reconstruct-1TB"),
    pytest.param(_reconstruct_call(np.ndarray, (0,), b"O"), "_reconstruct arguments", id="reconstruct-object"),
    pytest.param(_Call(np.dtype, "O"), r"numpy\.dtype\('O'\)", id="dtype-object"),
    pytest.param(_Call(np.dtype, [("a", "u1"), ("b", "i4")]), "numpy.dtype", id="dtype-structured"),
    pytest.param(_Call(np.dtype, ("u1", (4,))), "numpy.dtype", id="dtype-subarray"),
    pytest.param(_Call(np.dtype, "M8[ns]"), "numpy.dtype", id="dtype-datetime"),
    pytest.param(_Call(np.ndarray, (3,), "u1"), "call of numpy.ndarray", id="ndarray-called"),
    pytest.param(_Call(np.ndarray.__reduce__(np.zeros(0))[0], np.ndarray, (0,), _Call(builtins.bytes, 5)),
                 r"bytes\(\) with arguments", id="bytes-with-args"),
    pytest.param(_Call(codecs.encode, "x", "rot13"), "_codecs.encode arguments", id="codecs-rot13"),
    pytest.param(_Call(_np_scalar, np.dtype("i8"), [1]), "scalar value list", id="scalar-of-list"),
    pytest.param(_Call(_np_frombuffer, b"x" * 8, "i8", (1,), "C"), "(dtype argument str|_frombuffer arguments str)",
                 id="frombuffer-str-dtype"),
])
def test_numpy_globals_only_take_numpy_arguments(payload, refusal):
    for writer in ("py2", 2, 4):
        with pytest.raises(UnsafePickleError, match=f"^refused {refusal}"):
            safe_pickle.load(io.BytesIO(_dumps(payload, writer)))


def test_object_arrays_are_refused():
    """Decided: refused, even holding plain ints/str, since CIFAR has none and they'd need arbitrary objects."""
    for arr in (np.array([1, "x", None], dtype=object), np.zeros(2, dtype=[("a", "O"), ("b", "u1")])):
        for writer in ("py2", 2, 5):
            # the structured one is refused at its outer dtype ('V9'), before its object field
            with pytest.raises(UnsafePickleError, match=r"^refused numpy\.dtype\('(O8|V9)'\)"):
                safe_pickle.load(io.BytesIO(_dumps({"data": arr}, writer)))


class _Dtype:
    """A dtype pickled with a crafted state (numpy would trust its flags)."""

    def __init__(self, code, state, copy=True):
        self.code, self.state, self.copy = code, state, copy

    def __reduce__(self):
        return np.dtype, (self.code, False, self.copy), self.state


def test_crafted_dtype_state_is_refused():
    good = (3, "<", None, None, None, -1, -1, 0)
    for state in [(3, "<", None, None, None, -1, -1, 1),  # "holds object pointers" on int64: numpy errors
                  (3, "<", None, None, None, -1, -1, 63),
                  (3, "|", None, ("a",), {"a": (np.dtype("u1"), 0)}, 8, 1, 0),
                  (4, "<", None, None, None, -1, -1, 0, {"meta": 1}), (3, "?") + good[2:], "junk"]:
        payload = pickle.dumps(_Dtype("i8", state), protocol=2)
        with pytest.raises(UnsafePickleError, match="^refused dtype state"):
            safe_pickle.load(io.BytesIO(payload))
    # the same construction with the state numpy writes loads, and byte order is honoured
    d = safe_pickle.load(io.BytesIO(pickle.dumps(_Dtype("i8", (3, ">") + good[2:]), protocol=2)))
    assert d == np.dtype(">i8")
    # copy=False in the file cannot make BUILD touch numpy's shared int64 dtype
    d = safe_pickle.load(io.BytesIO(pickle.dumps(_Dtype("i8", (3, ">") + good[2:], copy=False), protocol=2)))
    assert d == np.dtype(">i8") and d is not np.dtype("i8") and np.dtype("i8").isnative


def test_build_only_on_arrays_and_dtypes():
    class Stateful:
        def __reduce__(self):
            return builtins.bytes, (), {"x": 1}  # BUILD on the b"" that bytes() returns

    data = pickle.dumps(Stateful(), protocol=2)
    with pytest.raises(UnsafePickleError, match="^refused BUILD on bytes"):
        safe_pickle.load(io.BytesIO(data))


def test_persistent_ids_and_extension_codes_are_refused():
    class P(pickle.Pickler):
        def persistent_id(self, obj):
            return "ref" if obj == "secret" else None

    buf = io.BytesIO()
    P(buf, protocol=2).dump({"data": "secret"})
    with pytest.raises(UnsafePickleError, match="^refused persistent id 'ref'"):
        safe_pickle.load(io.BytesIO(buf.getvalue()))

    # EXT opcodes: the copyreg cache would hand out os.system without asking find_class
    code = 0x7FFFF0
    copyreg.add_extension(os.system.__module__, "system", code)
    try:
        data = pickle.dumps(_Call(os.system, "true"), protocol=2)
        assert pickle.EXT4 in data
        copyreg._extension_cache[code] = os.system
        with pytest.raises(UnsafePickleError, match=f"^refused extension code {code}"):
            safe_pickle.load(io.BytesIO(data))
    finally:
        copyreg.remove_extension(os.system.__module__, "system", code)


# ----------------------------------------------------------------------------------------------
# Truncated and malformed files: pickle.UnpicklingError (never EOFError)


@pytest.mark.parametrize("writer", ["py2", 0, 2, 5])
def test_truncated_file_raises_unpicklingerror(tmp_path, writer):
    data = _dumps(_cifar10_batch(np.random.default_rng(2), n=3), writer)
    cuts = sorted({0, 1, 2, 5, 20, 40, 60, 100, len(data) // 2, len(data) - 100, len(data) - 2, len(data) - 1})
    for cut in cuts:
        (tmp_path / "t").write_bytes(data[:cut])
        with pytest.raises(pickle.UnpicklingError) as e:
            safe_pickle.load(tmp_path / "t")
        assert not isinstance(e.value, UnsafePickleError), cut
    assert isinstance(safe_pickle.load(io.BytesIO(data)), dict)


def test_malformed_file_raises_unpicklingerror():
    for data in (b"\x80\x02R.", b"\x80\x02K\x01K\x02s.", b"\x80\x02\xff.", b"\x80\x09N."):
        with pytest.raises(pickle.UnpicklingError):
            safe_pickle.load(io.BytesIO(data))
