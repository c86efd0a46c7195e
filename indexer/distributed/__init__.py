"""Scale-out indexing on Ray (``loupe index ... --ray [ADDRESS]``).

* ``parallel``: Ray Data stages (decode tasks → embed actor pool → shard-writer actors) that write shards
  into the shared index folder in parallel; the driver only commits the manifest (the default);
* ``single_writer``: with ``--local-features``, decode + embed on Ray actors and the driver's writer
  (the local-feature PCA is fitted by one writer);
* ``stages``: the Ray Data functions and actors.

Files must be readable at the same paths from every Ray node, and the index folder writable from every
node (a shared filesystem or object-store mount): see docs/distributed.md.
"""

from indexer.distributed.parallel import index_on_ray

__all__ = ["index_on_ray"]
