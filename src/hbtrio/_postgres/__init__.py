"""`PostgresStore`: a store in PostgreSQL that several nodes share, one owner per process.

The modules, each importing only those above it:

* ``_schema``: the tables, the schema version, migrations, `connect`;
* ``_ownership``: who owns a process, what a claim decides, a node's own
  lease (sans-I/O);
* ``_rows``: the statements: rows in and out, the fence's check;
* ``_iothread``: the data thread: job rounds, group commit behind the fence;
* ``_control``: the control thread: the node's row, heartbeats, claims,
  losses, the release;
* ``_writebehind``: results written behind, each under its owner's epoch;
* ``_pgstore``: `PostgresStore`, the `hbtrio.Store` operations over them.

It needs psycopg 3 (``pip install 'hbtrio[postgres]'``), imported when
this package is. The guarantees and how a cluster is run are in
docs/cluster.md.
"""

from ._control import Claim as Claim
from ._pgstore import ClusterStatistics as ClusterStatistics
from ._pgstore import PostgresStore as PostgresStore

__all__ = ["Claim", "ClusterStatistics", "PostgresStore"]
