"""The exceptions of pyshmlock: one per variant of the Rust library's ``Error``, under one base.

Every exception raised by this package is a :class:`ShmlockError`. Where a standard exception
means the same thing, the class derives from it too, so ``except TimeoutError`` or
``except ValueError`` work as they do with the standard library:

.. code-block:: text

    ShmlockError
    ├── Timeout (TimeoutError)            a wait gave up; names the holder
    │   └── WouldBlock                    busy, and the call was not to wait
    ├── AlreadyHeld                       this client already holds the name
    ├── NotHeld                           unlock of a lock not (or no longer) held
    ├── BadName (ValueError)              empty or too long a name
    ├── TableFull                         no room for another name, waiter or client
    ├── Cancelled                         the wait was withdrawn on the client's behalf
    ├── Interrupted                       the wait was interrupted by its caller
    ├── ForkedClient                      a forked child used its parent's client
    ├── SupervisorRunning                 another shmlockd supervises the segment
    ├── ConfigError (ValueError)          a capacity or setting out of range
    ├── SegmentError                      the segment cannot be used:
    │   ├── SegmentMissing                  it does not exist (start shmlockd)
    │   ├── SegmentExists, BadSegmentName (ValueError), SegmentWrongOwner, SegmentSymlink,
    │   │   SegmentNotRegular, SegmentLinked, SegmentModeTooWide, SegmentInUse, SegmentRemoved
    │   └── WrongMagic, WrongVersion, SegmentTooSmall, Corrupt, WrongState
    ├── RemoteError                       the gateway refused a request (``.code``)
    ├── ProtocolVersionError              the gateway speaks another protocol version
    ├── GatewayConnectionError (ConnectionError)
    └── ShmlockOSError (OSError)          a system call failed (``.errno``)
"""

from __future__ import annotations

from typing import Optional


class ShmlockError(Exception):
    """The base of every exception of this package."""


class Timeout(ShmlockError, TimeoutError):
    """A wait for a lock gave up.

    Attributes: ``name`` (the lock), ``waited`` (seconds), and, when the lock was held at the
    deadline, ``holder_pid``, ``holder_label``, ``held_for`` (seconds the holder had held it)
    and ``holders`` (more than one in shared mode); else those are None.
    """

    name: object = None
    waited: float = 0.0
    holder_pid: Optional[int] = None
    holder_label: Optional[str] = None
    held_for: Optional[float] = None
    holders: Optional[int] = None


class WouldBlock(Timeout):
    """The lock is busy and the call was not to wait (``blocking=False`` or ``timeout=0``)."""


class AlreadyHeld(ShmlockError):
    """This client already holds the name (re-locking is an error, never a self-deadlock)."""


class NotHeld(ShmlockError):
    """Unlock of a lock this client does not hold, or no longer holds (released already, or
    taken away by ``shmlock release --force``)."""


class BadName(ShmlockError, ValueError):
    """A lock name is empty or longer than the segment allows."""


class TableFull(ShmlockError):
    """A fixed-size pool of the segment is full (lock names, waiters or clients): nothing that
    was held is lost; raise the capacity in shmlockd's configuration (a new segment)."""


class Cancelled(ShmlockError):
    """A wait was withdrawn on the client's behalf (its locks were released meanwhile)."""


class Interrupted(ShmlockError):
    """A wait was interrupted by its caller; the request was withdrawn."""


class ForkedClient(ShmlockError):
    """A client was used in a child process after ``fork()``: open a new client in the child.

    Attributes: ``opened_by`` (the pid of the process that opened it) and ``pid`` (this one).
    """

    opened_by: int = 0
    pid: int = 0


class SupervisorRunning(ShmlockError):
    """Another live shmlockd supervises the segment."""


class ConfigError(ShmlockError, ValueError):
    """A capacity or setting is out of range."""


class SegmentError(ShmlockError):
    """The shared-memory segment cannot be used. ``segment`` names it where known."""

    segment: Optional[str] = None


class SegmentMissing(SegmentError):
    """No segment of that name exists: start ``shmlockd`` (which creates it), or open the client
    with ``create=True``."""


class SegmentExists(SegmentError):
    """A segment of that name exists already."""


class BadSegmentName(SegmentError, ValueError):
    """A segment name is not of the form ``/name``."""


class SegmentWrongOwner(SegmentError):
    """The segment's file belongs to a user this process does not trust."""


class SegmentSymlink(SegmentError):
    """The segment's name in /dev/shm is a symbolic link (never followed)."""


class SegmentNotRegular(SegmentError):
    """The segment's name in /dev/shm is not a regular file."""


class SegmentLinked(SegmentError):
    """The segment's file has more than one name (a hard link)."""


class SegmentModeTooWide(SegmentError):
    """The segment's permissions are wider than shmlockd is configured with."""


class SegmentInUse(SegmentError):
    """The segment is still used by other processes (it was not removed)."""


class SegmentRemoved(SegmentError):
    """The segment was retired by its supervisor and takes no new clients."""


class WrongMagic(SegmentError):
    """The segment is not a shmlock segment."""


class WrongVersion(SegmentError):
    """The segment was made by a build with another layout version."""


class SegmentTooSmall(SegmentError):
    """The segment is smaller than its header says it must be."""


class Corrupt(SegmentError):
    """Something in the segment contradicts its invariants."""


class WrongState(SegmentError):
    """A record of the segment was not in the state expected."""


class RemoteError(ShmlockError):
    """The gateway refused a request with one of the protocol's codes (``code``, e.g.
    ``"TOO_MANY_LOCKS"``)."""

    code: str = ""


class ProtocolVersionError(ShmlockError):
    """The gateway speaks another version of the protocol than this client."""


class GatewayConnectionError(ShmlockError, ConnectionError):
    """The connection to the gateway failed, closed, or carried something unexpected."""


class ShmlockOSError(ShmlockError, OSError):
    """A system call failed; ``errno`` is the OS error number where there is one."""


__all__ = [name for name, value in globals().items() if isinstance(value, type) and issubclass(value, Exception)]
