"""star: worker 0 is the hub linked to every other worker; Metropolis-Hastings weights:
hub-leaf 1/n, leaf self 1 - 1/n, hub self 1/n.
"""

from topologies.base import TOPOLOGIES, Topology, metropolis_hastings, no_arg


@TOPOLOGIES.register("star", "hub worker 0 linked to all others, Metropolis-Hastings weights")
def star(n: int, arg: str | None) -> Topology:
    no_arg("star", arg)
    return Topology("star", n, [metropolis_hastings([(0, j) for j in range(1, n)], n)])
