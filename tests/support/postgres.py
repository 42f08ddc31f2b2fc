"""The tests' PostgreSQL cluster: scripts.lab.tempcluster (also used by the benchmark)."""

from scripts.lab.tempcluster import Cluster, running_cluster

__all__ = ["Cluster", "running_cluster"]
