"""Imported by launcher=local's fork server alone, the first of what it preloads: the server dies with the
launcher that started it, as each rank it forks dies with the server (launch/local.py).

multiprocessing's server exits once every copy of the launcher's "alive" pipe is closed, but it hands a
copy to each process it forks: while ranks live, it would outlive a launcher killed by SIGKILL, and so
would they. (Linux counts the parent thread: the launcher thread whose spawn started the server must live
as long as its ranks; trident spawns from the main thread.) Import this module nowhere else: the
importing process is bound to its parent's life.
"""

from launch.local import die_with_parent

die_with_parent()
