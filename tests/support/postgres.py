"""The tests' PostgreSQL cluster: keystore.postgres.tempcluster (also used by the benchmark)."""

from keystore.postgres.tempcluster import Cluster, running_cluster

__all__ = ["Cluster", "running_cluster"]
