"""file: a fixed mixing matrix read from disk ("file:/path/W.npy" or "file:/path/W.csv").

The .npy holds a 2-D float array; the .csv holds comma-separated floats, one row per
line, no header. Row i is the weights worker i gives to every x_j. The matrix must be
n x n, non-negative and doubly stochastic, with a connected graph. Period 1.
"""

import os

import numpy as np

from bench.errors import UserError
from topologies.base import TOPOLOGIES, Topology, count_components, validate_matrix


def load_matrix(path: str) -> np.ndarray:
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".npy", ".csv"):
        raise UserError(f"topology file {path!r} must end in .npy or .csv; got {ext or 'no extension'!r}")
    if not os.path.exists(path):
        raise UserError(f"topology file {path!r} does not exist")
    if not os.path.isfile(path):
        raise UserError(f"topology file {path!r} is not a regular file")
    try:
        if ext == ".npy":
            W = np.load(path, allow_pickle=False)
        else:
            W = np.loadtxt(path, delimiter=",", ndmin=2, dtype=np.float64)
    except Exception as e:  # any parse or I/O failure is the user's file
        msg = " ".join(str(e).split()) or type(e).__name__
        raise UserError(f"cannot read topology file {path!r}: {msg}") from None
    return W


@TOPOLOGIES.register("file", "a fixed n x n matrix from a .npy or .csv file (file:/path/W.npy)")
def from_file(n: int, arg: str | None) -> Topology:
    if arg is None:
        raise UserError("topology 'file' needs a path, e.g. file:/path/W.npy or file:/path/W.csv")
    path = os.path.expanduser(arg)
    W = validate_matrix(load_matrix(path), n, f"topology file {path!r}")
    k = count_components([W])
    if k > 1:
        raise UserError(f"topology file {path!r} is disconnected: its graph has {k} components; workers would never agree")
    return Topology(f"file:{arg}", n, [W])
