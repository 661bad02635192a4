"""pyshmlock: crash-safe named locks for processes on one machine (shmlock), from Python.

.. code-block:: python

    import pyshmlock

    client = pyshmlock.Client()           # the segment $SHMLOCK_SEGMENT, else /shmlock
    with client.lock("orders/42", timeout=5.0) as g:
        write(order, fence=g.token)      # fencing token: strictly increasing per name
        if g.owner_died:
            repair()                     # the previous holder died holding the lock

A name locked again and again is best kept in a ``Lock`` (``threading.Lock``'s shape; a pair
allocates nothing):

.. code-block:: python

    lock = pyshmlock.Lock(client, "orders/42", timeout=5.0)
    with lock:                           # or lock.acquire() ... lock.release()
        write(order, fence=lock.token)

A client is one owner: a name it holds cannot be locked again through it (``AlreadyHeld``),
from any thread; two threads that must exclude each other open a client each. A lock is given
back by ``Guard.release()``, by the end of its ``with`` block, when the guard is collected, when
the client is, or when the process dies (``shmlockd`` reaps it; the next holder sees
``owner_died``).

After ``fork()`` (``multiprocessing``'s fork start method), a child that uses its parent's
client gets ``ForkedClient``: it opens its own ``Client``.
"""

from ._errors import *  # noqa: F401,F403  (the exception classes)
from ._errors import __all__ as _errors_all
from ._pyshmlock import DEFAULT_SEGMENT, INTERRUPT_CHECK, Client, Guard, Lock, RemoteClient

__all__ = ["Client", "RemoteClient", "Guard", "Lock", "DEFAULT_SEGMENT", "INTERRUPT_CHECK", *_errors_all]
