"""Entry point of the background daemon process started by `envfs mount`.

A process of its own rather than a fork, so that it starts with the malloc
settings of `mount.MALLOC_TUNABLES`; the parent passes the mount spec as an
argument and the PIN through a pipe.
"""

import sys

from .mount import daemon_main

if __name__ == "__main__":
    daemon_main(sys.argv[1])
