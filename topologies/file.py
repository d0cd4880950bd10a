"""file: a fixed mixing matrix read from disk ("file:/path/W.npy" or "file:/path/W.csv").

The .npy holds a 2-D float array; the .csv holds comma-separated floats, one row per
line, no header. Row i is the weights worker i gives to every x_j. The matrix must be
n x n, non-negative and doubly stochastic, with a connected graph; or only column-stochastic,
a directed graph (worker j pushes to the i with W_ij > 0), strongly connected, for push-sum
(--algo sgp). Period 1. The file is read and checked dense (such files are small); the Topology
keeps it as a CSR array like every other family.
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
    M, what = load_matrix(path), f"topology file {path!r}"
    try:
        W, directed = validate_matrix(M, n, what), False
    except UserError as e:
        try:  # only its columns sum to 1: a directed graph, for push-sum
            W, directed = validate_matrix(M, n, what, rows=False), True
        except UserError:
            raise e from None
    k = count_components([W], strong=directed)
    if k > 1:
        how = "not strongly connected" if directed else "disconnected"
        raise UserError(f"topology file {path!r} is {how}: its graph has {k} components; workers would never agree")
    return Topology(f"file:{arg}", n, [W], directed=directed)
