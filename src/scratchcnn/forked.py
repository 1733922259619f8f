"""Forked worker processes, and the shared memory and messages they work with.

The engine's answer to the GIL: Python threads share one interpreter lock, which every NumPy call
takes back, so two threads running many mid-sized NumPy calls spend a good part of their time
handing it over (two simple-cnn shards in threads took ~20% longer than in processes). A forked
worker has its own interpreter; it starts as a copy of this process, so nothing is pickled:

- arrays made by ``SharedArrays`` before the fork are the same memory in both processes;
- requests and replies are a JSON header plus arrays sent as raw bytes (``send_message``); a
  request's arrays may instead be copied into the worker's shared inbox (``request``);
- a worker's exception is raised again in the caller, a dead worker is reported as such;
- while it answers a request, a worker may ask the caller something (``ask_parent``): the caller
  reads the question with ``reply()`` and answers it with ``request()``;
- the messages exchanged within a request (questions, answers, the reply), each awaited by a
  process polling for it, go through a shared-memory mailbox when they fit: a pipe round trip
  costs ~60 us of system calls and wake-ups, paid by each of a bn-cnn step's 14 collectives.

Linux only (``processes_available``): macOS's system libraries are not safe to use after a
fork, and Windows cannot fork. Callers fall back to threads elsewhere.
"""

from __future__ import annotations

import builtins
import contextlib
import json
import mmap
import multiprocessing
import os
import platform
import signal
import sys
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import numpy as np

_ALIGN = 64  # bytes: each shared array starts on its own cache line
# How long a process that expects an answer soon polls for it (pipe and mailbox) before it
# sleeps: waking a sleeping process costs ~0.05-0.1 ms on the development machine, paid by every
# BatchNorm collective of a sharded step (bn-cnn at batch 10: ~4% of the step) and by each reply.
SPIN_SECONDS = 0.005

# A mailbox (one per direction per worker) holds one message of up to this many bytes, JSON and
# arrays; larger ones take the pipe. Only the pages used are ever allocated.
MAILBOX_BYTES = 2**20
# A message announced by a counter stored after it is safe to read once the counter is seen only
# where stores become visible to other cores in program order (x86's total store order); other
# machines use the pipe.
_ORDERED_STORES = platform.machine().lower() in ("x86_64", "amd64")
# After SPIN_SECONDS, a process waiting for a message that may come by mailbox, which wakes no
# one, sleeps on its pipe this long at a time between looks.
NAP_SECONDS = 0.0002

Message = dict[str, Any]
Handler = Callable[[Message, list[np.ndarray]], tuple[Message, Sequence[np.ndarray]]]


def processes_available() -> bool:
    """Whether workers can be forked here (Linux)."""
    return sys.platform.startswith("linux")


class _SharedMemory(mmap.mmap):
    """An anonymous ``MAP_SHARED`` mapping: a fork shares it instead of copying it."""


def _aligned_offsets(sizes: Sequence[int]) -> tuple[list[int], int]:
    """Where blocks of ``sizes`` bytes start when laid one after another, each on its own cache
    line, and where the last one's line ends."""
    offsets, end = [], 0
    for size in sizes:
        offsets.append(end)
        end += -(-size // _ALIGN) * _ALIGN
    return offsets, end


class SharedArrays:
    """Empty arrays of the given ``(shape, dtype)`` pairs, laid out in one anonymous shared
    mapping: a process forked after it is made sees every later write to them, both ways."""

    def __init__(self, layout: Sequence[tuple[tuple[int, ...], np.dtype]]) -> None:
        offsets, end = _aligned_offsets([int(np.prod(shape)) * np.dtype(dtype).itemsize
                                         for shape, dtype in layout])
        self._memory = _SharedMemory(-1, max(end, 1))
        self.arrays = [np.ndarray(shape, dtype, self._memory, offset)
                       for (shape, dtype), offset in zip(layout, offsets, strict=True)]


def layout_of(arrays: Sequence[np.ndarray]) -> list[tuple[tuple[int, ...], np.dtype]]:
    """The ``(shape, dtype)`` of each array: ``SharedArrays(layout_of(arrays))`` mirrors them."""
    return [(array.shape, array.dtype) for array in arrays]


def shared_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A C-ordered array (contents garbage) in shared memory where workers can be forked, else
    an ordinary one."""
    if not processes_available():
        return np.empty(shape, dtype)
    return SharedArrays([(shape, np.dtype(dtype))]).arrays[0]


def is_shared(array: np.ndarray) -> bool:
    """Whether ``array`` lies in memory made by ``SharedArrays`` (a fork would share it)."""
    owner: Any = array
    while owner is not None:  # views, and as_strided's wrappers, name what they view as .base
        if isinstance(owner, _SharedMemory):
            return True
        owner = getattr(owner, "base", None)
    return False


def _memory_order(array: np.ndarray) -> tuple[list[int], np.ndarray]:
    """The axes of ``array`` from the largest stride to the smallest, and the array transposed
    so: copied C-ordered, it keeps ``array``'s memory order (channels-last stays channels-last,
    so the receiver computes exactly as we do)."""
    order = sorted(range(array.ndim), key=lambda axis: -abs(array.strides[axis]))
    return order, array.transpose(order)


def _header(stored: np.ndarray, order: list[int], **more: Any) -> dict[str, Any]:
    return {"shape": stored.shape, "dtype": stored.dtype.str, "order": order, **more}


def _restored(stored: np.ndarray, header: dict[str, Any]) -> np.ndarray:
    return stored.transpose(tuple(np.argsort(header["order"])))


def _stored(array: np.ndarray) -> tuple[np.ndarray, dict[str, Any]]:
    """``array`` as the C-ordered array whose bytes travel (in its own memory order), and the
    header that rebuilds it (``_restored``)."""
    order, transposed = _memory_order(array)
    stored = np.asarray(transposed, order="C")  # not ascontiguousarray: 0-d stays 0-d
    return stored, _header(stored, order)


def _recv_raw(conn: Any, header: dict[str, Any]) -> np.ndarray:
    """The array whose bytes were sent after ``header``: same values, shape, dtype and memory
    order as the sender's."""
    stored = np.empty(header["shape"], np.dtype(header["dtype"]))
    if stored.size:
        conn.recv_bytes_into(memoryview(stored).cast("B"))
    else:
        conn.recv_bytes()
    return _restored(stored, header)


def _put_in_inbox(inbox: mmap.mmap, arrays: Sequence[np.ndarray],
                  start: int = 0) -> tuple[list[dict[str, Any]], int] | None:
    """Copy ``arrays`` into ``inbox`` from byte ``start`` on, one after another (each in its
    memory order, cache-line aligned) and return their headers and the first free byte after
    them, or None if they do not fit."""
    offsets, end = _aligned_offsets([array.nbytes for array in arrays])
    if start + end > len(inbox):
        return None
    headers = []
    for array, offset in zip(arrays, offsets, strict=True):
        order, transposed = _memory_order(array)
        stored = np.ndarray(transposed.shape, array.dtype, inbox, start + offset)
        np.copyto(stored, transposed)
        headers.append(_header(stored, order, offset=start + offset))
    return headers, start + end


def _take_from_inbox(inbox: mmap.mmap, headers: list[dict[str, Any]]) -> list[np.ndarray]:
    """Views of the arrays ``_put_in_inbox`` placed: valid until the caller's next request."""
    return [_restored(np.ndarray(header["shape"], np.dtype(header["dtype"]), inbox,
                                 header["offset"]), header) for header in headers]


class _Mailbox:
    """One direction's slot in shared memory, for one message at a time: ``post`` writes the
    arrays, then the JSON text naming them, and only then counts the message in; the receiver's
    ``take`` returns each message counted in since its last (as copies: the slot is reused)."""

    def __init__(self, capacity: int = MAILBOX_BYTES) -> None:
        self._memory = _SharedMemory(-1, _ALIGN + capacity)
        self._counts = np.ndarray((3,), np.int64, self._memory)  # posted, JSON start, length
        self._taken = 0  # in the receiving process: how many it took

    def post(self, message: Message, arrays: Sequence[np.ndarray] = ()) -> bool:
        """Leave the message for the other process; False (nothing announced) if it does not
        fit, or where the announcement could be seen before the message (``_ORDERED_STORES``)."""
        if not _ORDERED_STORES:
            return False
        placed = _put_in_inbox(self._memory, arrays, start=_ALIGN)
        if placed is None:
            return False
        headers, start = placed
        text = json.dumps({**message, "arrays": headers}).encode()
        if start + len(text) > len(self._memory):
            return False
        self._memory[start:start + len(text)] = text
        self._counts[1:] = start, len(text)
        self._counts[0] += 1  # last: the receiver reads nothing before it sees this
        return True

    def take(self) -> tuple[Message, list[np.ndarray]] | None:
        """The next message posted, or None if none came since the last one taken."""
        if self._counts[0] == self._taken:
            return None
        self._taken += 1
        start, length = (int(value) for value in self._counts[1:])
        message = json.loads(self._memory[start:start + length])
        arrays = [view.copy(order="K")
                  for view in _take_from_inbox(self._memory, message.pop("arrays"))]
        return message, arrays


def _await_message(conn: Any, mailbox: _Mailbox,
                   alive: Callable[[], bool] = lambda: True
                   ) -> tuple[Message, list[np.ndarray]] | None:
    """The next message, from ``mailbox`` or from the pipe, or None once ``alive()`` turns False
    (checked every second). Polls both for ``SPIN_SECONDS``, then naps on the pipe between looks
    (a mailbox message wakes no one). Raises EOFError if the other end of the pipe closed."""
    deadline = time.perf_counter() + SPIN_SECONDS
    checked = time.perf_counter()
    while True:
        taken = mailbox.take()
        if taken is not None:
            return taken
        now = time.perf_counter()
        if conn.poll(0 if now < deadline else NAP_SECONDS):
            return recv_message(conn)
        if now - checked > 1.0:
            if not alive():
                return None
            checked = now


def _poll_awake(conn: Any) -> None:
    """Return once ``conn`` has something to read or after ``SPIN_SECONDS``, without sleeping:
    for waits that are usually short, and only where the waiting process would leave its core
    idle anyway (between requests only when the request said ``"linger"``: otherwise another
    process, such as an optimizer's worker, may need the core then)."""
    deadline = time.perf_counter() + SPIN_SECONDS
    while not conn.poll() and time.perf_counter() < deadline:
        pass


def _send(conn: Any, mailbox: _Mailbox, message: Message,
          arrays: Sequence[np.ndarray] = ()) -> None:
    """``message`` to a process that polls for it: by ``mailbox`` if it fits, else the pipe."""
    if not mailbox.post(message, arrays):
        send_message(conn, message, arrays)


def send_message(conn: Any, message: Message, arrays: Sequence[np.ndarray] = ()) -> None:
    """``message`` (JSON-able) carrying the arrays' headers, then each array's raw bytes: one
    JSON text to encode and decode per message, however many arrays follow."""
    stored = [_stored(array) for array in arrays]
    conn.send_bytes(json.dumps({**message, "arrays": [header for _, header in stored]}).encode())
    for contiguous, _ in stored:
        conn.send_bytes(memoryview(contiguous).cast("B") if contiguous.size else b"")


def recv_message(conn: Any, inbox: mmap.mmap | None = None) -> tuple[Message, list[np.ndarray]]:
    """What ``send_message`` sent, or a request whose arrays wait in the worker's ``inbox``."""
    message = json.loads(conn.recv_bytes())
    arrays = [_recv_raw(conn, header) for header in message.pop("arrays")]
    if "inbox" in message:
        assert inbox is not None
        arrays = _take_from_inbox(inbox, message.pop("inbox"))
    return message, arrays


class ForkedWorker:
    """A forked process answering requests with ``handler(message, arrays) -> (reply, arrays)``,
    made in the child by ``make_handler()`` (with everything the parent had at the fork). BLAS is
    limited to one thread there: the worker is meant to own one core.

    ``inbox_bytes``: shared memory that a request's arrays may be copied into instead of being
    written through the pipe (see ``request``); only the pages used are ever allocated."""

    def __init__(self, make_handler: Callable[[], Handler], name: str,
                 inbox_bytes: int = 0) -> None:
        context = multiprocessing.get_context("fork")
        self._conn, child_conn = context.Pipe()
        self._inbox = _SharedMemory(-1, inbox_bytes) if inbox_bytes else None
        self._up, self._down = _Mailbox(), _Mailbox()  # worker -> caller, caller -> worker
        self._asked = False  # whether the worker waits for an answer to its question
        self._process = context.Process(target=_serve,
                                        args=(make_handler, child_conn, self._conn, os.getpid(),
                                              self._inbox, self._up, self._down),
                                        name=name, daemon=True)
        self._process.start()
        child_conn.close()
        self._finalizer = weakref.finalize(self, _stop, self._process, self._conn)

    def request(self, message: Message, arrays: Sequence[np.ndarray] = (), *,
                through_inbox: bool = False) -> None:
        """Send a request, or the answer to the worker's ``ask_parent``; ``reply()`` waits for
        the worker's next message (do other work in between). ``through_inbox``: copy the arrays
        into the inbox if they fit (a memory copy, where a pipe costs ~0.1 ms per 100 KB); the
        handler then gets views that the next request through the inbox overwrites."""
        if self._asked and self._down.post(message, arrays):
            return  # an answer, which the worker polls for: by mailbox, since it fits
        placed = (_put_in_inbox(self._inbox, arrays)
                  if through_inbox and self._inbox is not None else None)
        try:
            if placed is None:
                send_message(self._conn, message, arrays)
            else:
                send_message(self._conn, {**message, "inbox": placed[0]})
        except OSError:
            self._died()

    def reply(self) -> tuple[Message, list[np.ndarray]]:
        """The answer to the last request (or a question the worker asks on the way with
        ``ask_parent``); the worker's exception is raised here if it failed."""
        try:
            received = _await_message(self._conn, self._up)
        except (EOFError, OSError):
            self._died()
        assert received is not None  # the default alive() never gives up
        message, arrays = received
        self._asked = bool(message.pop(_QUESTION, False))
        if "error" in message:
            raise _rebuilt_error(message["error"], message["message"])
        return message, arrays

    def _died(self) -> NoReturn:
        self._process.join(timeout=1)
        raise RuntimeError(f"a scratchcnn worker process died (exit code "
                           f"{self._process.exitcode}); it is restarted on the next call")

    def close(self) -> None:
        """Stop the worker; also done when this object is garbage-collected."""
        self._finalizer()


def _stop(process: Any, conn: Any) -> None:
    """Ask the worker to exit, kill it if it does not within a second, close the pipe."""
    if process.is_alive():
        with contextlib.suppress(OSError):
            send_message(conn, {"op": "exit"})
        process.join(timeout=1)
        if process.is_alive():
            process.kill()
            process.join()
    conn.close()


def _rebuilt_error(name: str, message: str) -> Exception:
    """The worker's exception as the same built-in type when there is one (a ValueError about a
    bad shard stays a ValueError), else a RuntimeError naming it."""
    error_type = getattr(builtins, name, None)
    if isinstance(error_type, type) and issubclass(error_type, Exception):
        return error_type(message)
    return RuntimeError(f"{name} in a scratchcnn worker process: {message}")


# In a worker: its end of the pipe to the caller, the caller's pid and the mailboxes up to it
# and down from it (set by ``_serve``).
_parent: tuple[Any, int, _Mailbox, _Mailbox] | None = None
# The key that marks a worker's message as a question (``ask_parent``), not its reply.
_QUESTION = "_asks_parent"


def _next_message(conn: Any, parent_pid: int,
                  inbox: mmap.mmap | None = None) -> tuple[Message, list[np.ndarray]] | None:
    """The caller's next message, or None once the caller is gone."""
    # Other workers forked later hold copies of this pipe's parent end too, so a killed
    # parent may never show as end-of-file: check it is still there once a second.
    while not conn.poll(1.0):
        if os.getppid() != parent_pid:
            return None
    try:
        return recv_message(conn, inbox)
    except EOFError:
        return None


def ask_parent(message: Message,
               arrays: Sequence[np.ndarray] = ()) -> tuple[Message, list[np.ndarray]]:
    """In a worker, while its handler answers a request: send ``message`` and ``arrays`` to the
    caller and wait for its answer. The worker exits here if the caller closes it meanwhile (the
    caller gave up on the request, e.g. after an error of its own) or goes away."""
    if _parent is None:
        raise RuntimeError("ask_parent is for the handler of a forked worker")
    conn, parent_pid, up, down = _parent
    _send(conn, up, {**message, _QUESTION: True}, arrays)
    try:  # the caller is mid-request, so its answer is near: polled for, not slept on
        answer = _await_message(conn, down, lambda: os.getppid() == parent_pid)
    except EOFError:
        answer = None
    if answer is None or answer[0].get("op") == "exit":
        raise SystemExit(0)  # not an Exception: _serve does not report it, the process ends
    return answer


def _serve(make_handler: Callable[[], Handler], conn: Any, parent_end: Any,
           parent_pid: int, inbox: mmap.mmap | None, up: _Mailbox, down: _Mailbox) -> None:
    """The worker's loop: answer requests until told to exit or the parent goes away."""
    global _parent
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    parent_end.close()  # the fork's copy of the parent's end would hide the parent's exit
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        pass  # only DataParallel's shards need one BLAS thread, and they never split without it
    else:
        threadpool_limits(limits=1, user_api="blas")
    _parent = conn, parent_pid, up, down
    handler = make_handler()
    while True:
        received = _next_message(conn, parent_pid, inbox)
        if received is None:
            return
        message, arrays = received
        if message.get("op") == "exit":
            return
        try:
            reply, reply_arrays = handler(message, arrays)
        except Exception as error:  # reported to the caller, who raises it
            _send(conn, up, {"error": type(error).__name__, "message": str(error)})
        else:  # the caller polls for the reply: by mailbox, if it fits
            _send(conn, up, reply, reply_arrays)
            if message.get("linger"):  # the caller expects to send the next request soon
                _poll_awake(conn)
