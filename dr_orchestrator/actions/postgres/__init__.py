"""``postgres.*`` actions: PostgreSQL streaming replication, looked at, fenced, promoted, measured, rebuilt.

Every action names a database of the inventory (``database``, optional when it describes one) and a
site; connection details come from ``dr.vars.databases``. The modules:

- ``base.py``: where a database lives, connections, and ``DatabaseAction``, the actions' base (the
  step's database, its site checked, the other site it works with);
- ``replication.py``: ``postgres.replication_status``, ``postgres.wait_caught_up``, ``postgres.set_sync``;
- ``promotion.py``: ``postgres.set_read_only`` (fencing), ``postgres.promote``;
- ``rpo.py``: ``postgres.rpo``;
- ``rebuild.py``: ``postgres.rebuild_standby``, which works over SSH on the database host.

The action modules import ``base.py`` and no one another. psycopg is imported only when a runbook
(or the watch) uses them: this package's ``__init__`` imports nothing.
"""
