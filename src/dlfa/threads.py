"""How many threads torch uses, and how they wait: chosen before torch loads (environment variables).

PyTorch runs its CPU operations on OpenMP threads. By default a thread that waits for its siblings spins for a
while, and on a machine shared with other jobs a sibling is often descheduled: the spinning threads then burn
the CPU share the process has instead of computing, and a run slows down far more than its lost share explains
(measured: ``benchmarks/load.py``). dlfa therefore asks OpenMP for passive waits (``OMP_WAIT_POLICY=PASSIVE``:
a waiting thread sleeps) unless the user set a policy, and ``DLFA_THREADS`` (or ``OMP_NUM_THREADS``) sets the
thread count; by default torch uses one thread per core this process may run on.
"""

from __future__ import annotations

import os


def configure() -> None:
    """Set the OpenMP environment for this process; call before torch is imported (the command line does)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    threads = os.environ.get("DLFA_THREADS")
    if threads:
        if not threads.isdigit() or int(threads) < 1:
            from dlfa.errors import DlfaInputError

            raise DlfaInputError(f"DLFA_THREADS must be a positive integer, got {threads!r}")
        os.environ["OMP_NUM_THREADS"] = threads
