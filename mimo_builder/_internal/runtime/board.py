"""A rank's last note in its own memory, readable by the other processes on its host.

The step guard notes what the main thread does at every schedule operation. Sending each note to
the job's store made that one process serve O(ranks x operations) requests per step; a note now
goes to a small anonymous shared-memory file (``memfd``) that the rank maps: a few microseconds,
no request. A process on the same host reads it through ``/proc/<pid>/fd/<fd>`` even while the
rank is stopped (SIGSTOP, a debugger) or hung, so a peer there names it with its exact last note;
a peer on another host has only what the rank's watchdog last published to the store, up to one
poll interval old. The file goes with the process: nothing is left behind, whatever way it ends.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct

SIZE = 4096
"""Bytes of the shared file: a header (sequence number, length), the owner's name and the note,
cut to fit."""
_HEADER = struct.Struct("<QI")  # sequence (odd while a write is under way), length of the note
_SEQ = struct.Struct("<Q")


class NoteBoard:
    """This rank's note board: :meth:`write` from one thread; :attr:`address` tells readers on
    this host where it is. Where the platform has no ``memfd`` it keeps nothing (address ``-``)."""

    def __init__(self, owner: str):
        name = f"{owner}\n".encode()[:SIZE // 2]  # readers check it: a reused pid or fd is someone else's
        self._start, self._seq = _HEADER.size + len(name), 0
        try:
            self._fd = os.memfd_create("mimo-note-board", os.MFD_CLOEXEC)
            os.ftruncate(self._fd, SIZE)
            self._map = mmap.mmap(self._fd, SIZE)
        except (AttributeError, OSError):  # not Linux: readers fall back to the published beat
            self._fd, self._map = -1, None
        else:
            self._map[_HEADER.size:self._start] = name
        self.address = f"{socket.gethostname()}:{os.getpid()}:{self._fd}" if self._map is not None else "-"
        """``host:pid:fd``, or ``-`` where there is no board."""

    def write(self, text: str) -> None:
        """Replace the note (a reader never takes half of one: it retries while the sequence
        number is odd or moved)."""
        if self._map is None:
            return
        data = text.encode()[:SIZE - self._start]
        self._map[:_HEADER.size] = _HEADER.pack(self._seq + 1, len(data))
        self._map[self._start:self._start + len(data)] = data
        self._seq += 2
        self._map[:_SEQ.size] = _SEQ.pack(self._seq)

    def close(self) -> None:
        """Unmap and close the file (idempotent); later writes do nothing."""
        if self._map is not None:
            self._map.close()
            os.close(self._fd)
            self._map = None


def read_note(address: str, owner: str) -> str | None:
    """The note on the board at ``address`` if it is on this host and still ``owner``'s, else None."""
    host, _, rest = address.partition(":")
    if address == "-" or host != socket.gethostname():
        return None
    pid, _, fd = rest.partition(":")
    try:
        with open(f"/proc/{pid}/fd/{fd}", "rb", buffering=0) as f:
            return _consistent(f, f"{owner}\n".encode()[:SIZE // 2])
    except OSError:  # the process is gone, or not ours to read
        return None


def _consistent(f, owner: bytes) -> str | None:
    """The note, once two reads in a row agree and no write was under way (a stopped rank's
    board does not move), if the board is ``owner``'s."""
    previous, start = None, _HEADER.size + len(owner)
    for _ in range(5):
        f.seek(0)
        raw = f.read(SIZE)
        seq, length = _HEADER.unpack_from(raw)
        if seq % 2 == 0 and raw == previous:
            return raw[start:start + length].decode(errors="replace") if raw[_HEADER.size:start] == owner else None
        previous = raw
    return None
