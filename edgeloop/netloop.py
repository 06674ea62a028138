"""One network thread for many MQTT connections: a selector over paho clients' sockets.

Each :class:`~edgeloop.mqtt.MqttLink` normally runs paho's ``loop_start()``: one thread per
connection. A simulated fleet of a thousand devices in one process would then run a thousand
network threads. A :class:`NetworkLoop` drives any number of links from one thread with paho's
external-loop API instead (``loop_read`` / ``loop_write`` / ``loop_misc`` and the socket
callbacks), so the thread count stays fixed however large the fleet::

    with NetworkLoop() as net:
        link = MqttLink(url, "dev-1", network_loop=net)
        link.start()            # same API, same semantics as with its own thread

How paho behaves here (read in paho-mqtt 2.2's client.py, not assumed):

* With ``on_socket_register_write`` set, ``publish()`` from any thread only queues the packet
  and asks for write interest; all socket I/O then happens on this loop's thread. paho calls that
  callback only when its own ``_registered_write`` flag flips, which races with a publisher
  thread, so the link also calls :meth:`NetworkLoop.wake` after each publish and the loop
  re-reads ``want_write()`` itself: write interest always follows paho's queue, never the flag.
* ``loop_read`` / ``loop_write`` close the socket and call ``on_disconnect`` when the
  connection breaks; ``loop_misc`` sends keep-alive pings and drops a connection whose ping was
  not answered. Nothing in the external-loop API reconnects, so this loop does, per link, with
  the link's own exponential backoff with jitter (:meth:`MqttLink._next_retry_delay`).
* ``reconnect()`` connects a blocking TCP socket (up to ``connect_timeout``) before it turns it
  non-blocking; on loopback and a LAN that takes a millisecond. A link whose reconnects are
  blocked (:meth:`MqttLink.cut`) fails at once, before any socket is made.

Only this loop's thread touches the selector; other threads post work with :meth:`call_soon`.

Per message costs matter at fleet scale (a model pushed to 1,000 devices is 16,000 chunks in and
as many PUBACKs out): what a read queues (PUBACKs) is written in the same pass instead of
through write interest and another select(), and another thread's wake-up byte is sent only
while the loop sleeps in select() (a busy loop looks at its queues before it sleeps again).
Each plain TCP socket is wrapped by :mod:`edgeloop.bufsock` when it opens: paho's byte-sized
header reads come from one larger read. Measured on the 1,000-device model push
(bench/ota_push.py): the network thread's CPU went from 4.2 s to 3.1-4.1 s.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import socket
import threading
import time
from typing import Any, Callable

from edgeloop import bufsock

__all__ = ["NetworkLoop"]

log = logging.getLogger(__name__)


class _Entry:
    """One paho client driven by the loop."""

    __slots__ = ("link", "client", "sock", "wanted", "write", "retry_at")

    def __init__(self, link: Any, client: Any) -> None:
        self.link = link
        self.client = client
        self.sock = None  # the socket registered in the selector, if any
        self.wanted = True  # keep it connected (False once the owner stopped it)
        self.write = False  # write interest registered
        self.retry_at: float | None = None  # when to try connecting again (monotonic)


class NetworkLoop:
    """Drives many paho clients from one thread; see the module docstring."""

    def __init__(self, *, name: str = "mqtt-network-loop", misc_interval_s: float = 1.0) -> None:
        self.name = name
        self.misc_interval_s = misc_interval_s
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._calls: list[Callable[[], None]] = []
        self._dirty: set[_Entry] = set()
        self._woken = False  # a wake-up byte is on its way (under _lock)
        self._sleeping = False  # the loop thread is in (or about to enter) select() (under _lock)
        self._entries: dict[int, _Entry] = {}  # id(client) -> entry
        self._timers: list[tuple[float, int, Callable[[], None]]] = []  # heap: reconnects, flush checks
        self._tie = itertools.count()
        self._thread: threading.Thread | None = None
        self._running = False
        #: Counters for benchmarks and diagnostics (loop thread writes, anyone reads).
        self.iterations = 0
        self.connect_attempts = 0
        self.connect_failures = 0

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> "NetworkLoop":
        if self._thread is not None:
            return self
        self._running = True
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and close every socket still open (owners should stop their links first)."""
        thread = self._thread
        if thread is None:
            return
        self._running = False
        self._wake(force=True)
        thread.join(timeout)
        if thread.is_alive():
            raise RuntimeError(f"{self.name} did not stop within {timeout} s")
        self._thread = None
        for entry in list(self._entries.values()):
            sock = entry.client.socket()
            if sock is not None:
                try:
                    sock.close()
                except OSError:
                    pass
        self._entries.clear()
        self._sel.close()
        self._wake_r.close()
        self._wake_w.close()

    def __enter__(self) -> "NetworkLoop":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def links(self) -> int:
        """How many clients the loop drives now."""
        return len(self._entries)

    def in_loop_thread(self) -> bool:
        return threading.current_thread() is self._thread

    # -- API for MqttLink (any thread) ---------------------------------------------------------

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread at its next pass."""
        if self._thread is None or not self._running:
            raise RuntimeError(f"{self.name} is not running: start() it before starting links on it")
        with self._lock:
            self._calls.append(fn)
        self._wake()

    def attach(self, link: Any, client: Any) -> None:
        """Drive ``client`` (already given its connect arguments by ``connect_async``) and connect it."""
        entry = _Entry(link, client)
        client.on_socket_open = lambda c, u, sock: self._on_open(entry, sock)
        client.on_socket_close = lambda c, u, sock: self._on_close(entry, sock)
        client.on_socket_register_write = lambda c, u, sock: self.wake(entry)
        client.on_socket_unregister_write = lambda c, u, sock: self.wake(entry)
        client._edgeloop_entry = entry  # lets wake(client) find its entry without a lookup table

        def add() -> None:
            self._entries[id(client)] = entry
            self._connect(entry)

        self.call_soon(add)

    def detach(self, client: Any, timeout: float = 2.0) -> None:
        """Stop driving ``client`` once it has written what it queued (its DISCONNECT) or after
        ``timeout``; then its socket is closed. Blocks the caller until done."""
        entry = getattr(client, "_edgeloop_entry", None)
        if entry is None:
            return
        done = threading.Event()
        deadline = time.monotonic() + timeout

        def finish() -> None:
            entry.wanted = False
            if entry.client.socket() is not None and entry.client.want_write() and time.monotonic() < deadline:
                self._write(entry)
                if entry.client.socket() is not None and entry.client.want_write():
                    self._after(0.01, finish)  # still flushing: look again shortly
                    return
            sock = entry.client.socket()
            if sock is not None:
                self._unregister(entry)
                try:
                    sock.close()
                except OSError:
                    pass
            self._entries.pop(id(entry.client), None)
            done.set()

        if not self._running:
            return
        self.call_soon(finish)
        if not self.in_loop_thread() and not done.wait(timeout + 5):
            log.warning("%s: detaching %s timed out", self.name, entry.link.client_id)

    def wake(self, target: Any) -> None:
        """Re-check ``target``'s (an entry or a paho client) write interest at the next pass."""
        entry = target if isinstance(target, _Entry) else getattr(target, "_edgeloop_entry", None)
        if entry is None:
            return
        with self._lock:
            self._dirty.add(entry)
        if not self.in_loop_thread():
            self._wake()

    # -- the loop ------------------------------------------------------------------------------

    def _wake(self, force: bool = False) -> None:
        # Only a loop blocked in select() needs the byte: a busy one looks at its queues under
        # the lock before it sleeps again. A fleet publishing from its scheduler thread would
        # otherwise cost a send() here and a recv() there for most of its publishes.
        with self._lock:
            if self._woken or not (self._sleeping or force):
                return
            self._woken = True
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass

    def _after(self, delay: float, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the loop thread after ``delay`` seconds (loop thread only)."""
        heapq.heappush(self._timers, (time.monotonic() + delay, next(self._tie), fn))

    def _run(self) -> None:
        next_misc = time.monotonic() + self.misc_interval_s
        while self._running:
            now = time.monotonic()
            timeout = next_misc - now
            if self._timers:
                timeout = min(timeout, self._timers[0][0] - now)
            with self._lock:  # work queued since the last pass, or while it ran: do not sleep
                if self._dirty or self._calls or not self._running:
                    timeout = 0.0
                self._sleeping = timeout > 0.0
            try:
                events = self._sel.select(max(0.0, min(timeout, 1.0)))
            except OSError:  # a descriptor closed under us; the next pass sees a clean set
                events = []
            with self._lock:
                self._sleeping = False
            self.iterations += 1
            for key, mask in events:
                entry = key.data
                if entry is None:
                    self._drain_wake()
                    continue
                try:
                    if mask & selectors.EVENT_READ:
                        self._read(entry)
                    if mask & selectors.EVENT_WRITE and entry.client.socket() is not None:
                        self._write(entry)
                except Exception:  # one client's trouble must not stop the fleet's network
                    log.exception("%s: I/O of %s failed", self.name, entry.link.client_id)
            self._run_calls()
            self._sync_dirty()
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                _, _, fn = heapq.heappop(self._timers)
                try:
                    fn()
                except Exception:
                    log.exception("%s: a timer failed", self.name)
            if now >= next_misc:
                next_misc = now + self.misc_interval_s
                for entry in list(self._entries.values()):
                    if entry.client.socket() is not None:
                        try:
                            entry.client.loop_misc()  # keep-alive pings, dead-peer detection
                        except Exception:
                            log.exception("%s: loop_misc of %s failed", self.name, entry.link.client_id)
                    self._check_down(entry)
                self._sync_dirty()

    def _drain_wake(self) -> None:
        # Empty the socket first, then allow the next wake-up byte: a wake() in between either
        # leaves its byte for the next select() or finds its work picked up by this pass.
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass
        with self._lock:
            self._woken = False

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for fn in calls:
            try:
                fn()
            except Exception:
                log.exception("%s: a scheduled call failed", self.name)

    def _sync_dirty(self) -> None:
        """Try to write what each woken client queued; keep write interest only while some is left."""
        with self._lock:
            dirty, self._dirty = self._dirty, set()
        for entry in dirty:
            if entry.client.socket() is not None and entry.client.want_write():
                try:
                    self._write(entry)
                except Exception:
                    log.exception("%s: write of %s failed", self.name, entry.link.client_id)
            self._set_write(entry)
            self._check_down(entry)

    def _read(self, entry: _Entry) -> None:
        client = entry.client
        client.loop_read()
        sock = client.socket()
        # Bytes already read wait inside the socket object (bufsock's buffer, or the records an
        # SSL socket decrypted), where select() cannot see them: read on while there are any.
        while sock is not None and getattr(sock, "pending", None) and sock.pending():
            client.loop_read()
            sock = client.socket()
        # What reading queued (PUBACKs, PINGRESP answers) goes out now: the socket is almost
        # always writable, and this spares a selector modify() each way plus a pass per message.
        if sock is not None and client.want_write():
            client.loop_write()
        self._set_write(entry)
        self._check_down(entry)

    def _write(self, entry: _Entry) -> None:
        entry.client.loop_write()
        self._set_write(entry)
        self._check_down(entry)

    def _set_write(self, entry: _Entry) -> None:
        sock = entry.client.socket()
        if sock is None or entry.sock is not sock:
            return
        want = entry.client.want_write()
        if want != entry.write:
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if want else 0)
            try:
                self._sel.modify(sock, events, entry)
                entry.write = want
            except (KeyError, ValueError, OSError):
                pass

    def _check_down(self, entry: _Entry) -> None:
        """A wanted client without a socket gets a reconnect scheduled (once)."""
        if entry.client.socket() is None and entry.sock is not None:
            self._unregister(entry)
        if entry.wanted and entry.client.socket() is None and entry.retry_at is None \
                and id(entry.client) in self._entries:
            delay = entry.link._next_retry_delay()
            entry.retry_at = time.monotonic() + delay
            self._after(delay, lambda: self._retry(entry))

    def _retry(self, entry: _Entry) -> None:
        entry.retry_at = None
        if entry.wanted and entry.client.socket() is None and id(entry.client) in self._entries:
            self._connect(entry)

    def _connect(self, entry: _Entry) -> None:
        self.connect_attempts += 1
        try:
            entry.client.reconnect()  # calls on_socket_open, queues CONNECT
        except Exception as exc:  # OSError: refused, timed out, cut; anything else: logged the same
            self.connect_failures += 1
            entry.link._connect_failed(exc)
        else:
            self.wake(entry)
        self._check_down(entry)

    # -- socket callbacks (paho calls them from whichever thread does the I/O) -------------------

    def _on_open(self, entry: _Entry, sock) -> None:
        if not self.in_loop_thread():  # reconnect() only ever runs on the loop thread
            raise RuntimeError("a looped MQTT client opened a socket outside its network loop")
        # paho reads through a buffer from now on: its byte-sized reads of each packet's header
        # cost no system call (edgeloop.bufsock).
        sock = bufsock.adopt(entry.client, sock)
        self._unregister(entry)
        try:
            self._sel.register(sock, selectors.EVENT_READ, entry)
        except KeyError:  # a stale registration of a recycled descriptor number
            self._sel.unregister(sock.fileno())
            self._sel.register(sock, selectors.EVENT_READ, entry)
        entry.sock, entry.write = sock, False

    def _on_close(self, entry: _Entry, sock) -> None:
        if self.in_loop_thread():
            if entry.sock is sock:
                self._unregister(entry)
        elif self._running:
            self.call_soon(lambda: self._unregister(entry) if entry.sock is sock else None)

    def _unregister(self, entry: _Entry) -> None:
        sock, entry.sock, entry.write = entry.sock, None, False
        if sock is None:
            return
        try:
            self._sel.unregister(sock)
        except (KeyError, ValueError):
            pass
