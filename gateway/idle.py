"""What the gateway's asyncssh connections let go of once set up: the memory of an idle attached session.

Every attached session is two asyncssh connections (the client's and the upstream one to the runner), and
asyncssh keeps for their whole life things it needed only to set them up: both sides' KEXINIT payloads
(a key exchange stores new ones), an options object of its own per connection (one copy made at connect,
and on the client side one more when authentication starts), the runner's signature algorithms, and the
algorithm lists of that options object; and one asyncio.Event per connection and per channel whose empty
deque alone is ~0.6 KiB. Measured with tracemalloc on a gateway holding idle sessions (bench/README.md):
together about a third of what one session costs. What is let go of here is either set again by asyncssh
when it is next needed, or never read again once authenticated; `missing_state` names the asyncssh
attributes this relies on, for the test that guards pyproject's asyncssh pin.

Then the shape of what is left: asyncssh's connections have ~150 attributes and its channels ~40, most of
them the same constant on every connection (flags, limits, negotiated algorithm names), and their dicts
are sized for all of them. `share_constants` moves those to the gateway's own connection and channel
classes (an attribute read falls back to the class), and each dict is rebuilt for the ~30 that differ.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from asyncssh.logging import SSHLogger

log = logging.getLogger(__name__)

# Connection and channel attributes read or replaced here.
_CONN_STATE = ("_client_kexinit", "_server_kexinit", "_options", "_close_event", "_kex_algs", "_enc_algs",
               "_mac_algs", "_cmp_algs", "_sig_algs", "_server_sig_algs", "_auth_complete", "_can_send_ext_info",
               "_extensions_to_send", "_trusted_host_keys", "_trusted_ca_keys", "_revoked_host_keys",
               "_x509_revoked_certs", "_trusted_host_key_algs", "_x509_trusted_certs", "_x509_trusted_subjects",
               "_x509_revoked_subjects", "_auth_methods", "_server_host_key_algs", "process_packet", "_tasks",
               "_logger")
# Client (runner side) connection attributes read or replaced here.
_CLIENT_STATE = ("_wait", "_waiter", "_preferred_auth", "_client_host_keys", "_client_keys")
# Sets asyncssh fills (or not) before authentication and only reads after: empty ones become one shared
# empty frozenset (an empty set is 216 bytes; a connection has up to five).
_READ_ONLY_SETS = ("_trusted_host_keys", "_trusted_ca_keys", "_revoked_host_keys", "_x509_revoked_certs",
                   "_server_sig_algs")
_CHAN_STATE = ("_close_event", "_logger")
# What SSHClientConnection.create_session reads from the connection's options (its defaults), the one use
# asyncssh makes of a client connection's options once it is authenticated.
_SESSION_DEFAULTS = ("command", "subsystem", "env", "send_env", "request_pty", "term_type", "term_size",
                     "term_modes", "x11_forwarding", "x11_display", "x11_auth_path", "x11_single_connection",
                     "encoding", "errors", "window", "max_pktsize")
# Lists asyncssh fills (or not) when it matches known hosts, before authentication, and only reads then:
# empty ones become one shared empty tuple once authenticated (moved to the class by share_constants).
_READ_ONLY_LISTS = ("_trusted_host_key_algs", "_x509_trusted_certs", "_x509_trusted_subjects",
                    "_x509_revoked_subjects")
# Lists asyncssh uses only to authenticate: once authenticated, tuples of the same names (constants, which
# share_constants moves to the class). (Lists it reads at each key exchange stay lists, shared: its debug
# logging formats a tuple argument as a host and port.)
_AUTH_LISTS = ("_auth_methods",)
_CLIENT_AUTH_LISTS = ("_preferred_auth", "_client_host_keys", "_client_keys", "_trusted_host_key_algs")
_NOTHING: frozenset[bytes] = frozenset()


def missing_state(conn: Any, *chans: Any) -> list[str]:
    """The attributes this module relies on that the installed asyncssh's connection (or channels) lack."""
    missing = [f"connection.{name}" for name in _CONN_STATE if not hasattr(conn, name)]
    missing += sorted({f"channel.{name}" for chan in chans for name in _CHAN_STATE if not hasattr(chan, name)})
    if not conn.is_server():
        missing += [f"connection.{name}" for name in _CLIENT_STATE if not hasattr(conn, name)]
        options = getattr(conn, "_options", None)
        missing += [f"options.{name}" for name in _SESSION_DEFAULTS if not hasattr(options, name)]
    return missing


_usable_by_class: dict[type, bool] = {}


def _usable(conn: Any) -> bool:
    """Whether this connection's class has the state relied on here (checked once per class); if not,
    nothing is let go of, and the gateway says so once."""
    usable = _usable_by_class.get(type(conn))
    if usable is None:
        missing = missing_state(conn)
        usable = _usable_by_class[type(conn)] = not missing
        if missing:
            log.warning("gateway keeps asyncssh's set-up state: this asyncssh lacks %s", ", ".join(missing))
    return usable


class LeanEvent:
    """asyncio.Event's set / is_set / wait / clear, its waiters in a list made on first wait (asyncio's own
    Event makes a deque up front: ~0.6 KiB per connection and per channel, almost never waited on)."""

    __slots__ = ("_value", "_waiters")

    def __init__(self) -> None:
        self._value = False
        self._waiters: list[asyncio.Future[bool]] | None = None

    def is_set(self) -> bool:
        return self._value

    def set(self) -> None:
        if not self._value:
            self._value = True
            for waiter in self._waiters or ():
                if not waiter.done():
                    waiter.set_result(True)

    def clear(self) -> None:
        self._value = False

    async def wait(self) -> bool:
        if self._value:
            return True
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        try:
            await waiter
            return True
        finally:
            self._waiters.remove(waiter)


class LeanTasks:
    """What asyncssh keeps a connection's tasks in (it adds and discards them, to hold a reference while they
    run), as a list made on the first: its empty set is 216 bytes per connection, almost always empty."""

    __slots__ = ("_tasks",)

    def __init__(self) -> None:
        self._tasks: list[Any] | None = None

    def add(self, task: Any) -> None:
        if self._tasks is None:
            self._tasks = []
        if task not in self._tasks:
            self._tasks.append(task)

    def discard(self, task: Any) -> None:
        if self._tasks is not None and task in self._tasks:
            self._tasks.remove(task)
            if not self._tasks:
                self._tasks = None

    def __contains__(self, task: object) -> bool:
        return self._tasks is not None and task in self._tasks

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._tasks or ()))

    def __len__(self) -> int:
        return len(self._tasks or ())


# asyncssh's loggers (one per connection and per channel) each get an empty dict of extra fields, which it
# never reads (its own process() adds the context): one read-only empty mapping serves them all.
_NO_EXTRA: Mapping[str, object] = MappingProxyType({})


def lean_close_event(obj: Any) -> None:
    """Give a new connection or channel a LeanEvent for its close, if nothing has used its own yet, and lean
    versions of its empty task set and its logger's empty extra fields."""
    event = getattr(obj, "_close_event", None)
    if type(event) is asyncio.Event and not event.is_set() and not event._waiters:
        obj._close_event = LeanEvent()
    tasks = getattr(obj, "_tasks", None)
    if type(tasks) is set and not tasks:
        obj._tasks = LeanTasks()
    logger = getattr(obj, "_logger", None)
    if isinstance(logger, SSHLogger) and type(logger.extra) is dict and not logger.extra:
        logger.extra = _NO_EXTRA


class _Interned:
    """One shared object per distinct value (lists of algorithm names, session defaults): every gateway
    connection of a side has the same ones, each its own copy."""

    def __init__(self) -> None:
        self._values: list[Any] = []

    def get(self, value: Any) -> Any:
        for known in self._values:
            if type(known) is type(value) and known == value:
                return known
        self._values.append(value)
        return value

    def holds(self, value: Any) -> bool:
        return any(known is value for known in self._values)


_interned = _Interned()


class SessionDefaults:
    """The options an authenticated client connection still reads (create_session's defaults), shared."""

    __slots__ = _SESSION_DEFAULTS

    def __init__(self, options: Any) -> None:
        for name in _SESSION_DEFAULTS:
            setattr(self, name, getattr(options, name))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SessionDefaults) and all(
            getattr(self, name) == getattr(other, name) for name in _SESSION_DEFAULTS)

    __hash__ = None  # type: ignore[assignment]


def before_key_exchange_ends(conn: Any) -> tuple[bytes, bytes]:
    """The KEXINITs of the key exchange about to end (for `after_key_exchange`)."""
    return getattr(conn, "_client_kexinit", b""), getattr(conn, "_server_kexinit", b"")


def after_key_exchange(conn: Any, kexinits: tuple[bytes, bytes]) -> None:
    """The exchange hash is computed: the KEXINITs it covered are read again by nothing (the next key
    exchange sends and receives new ones). A new one asyncssh already sent, when the key exchange's end
    let it start the next at once (its rekey limit), stays. So do the extensions asyncssh lists at every
    key exchange but sends once, after the first (RFC 8308), which is done by now."""
    if not _usable(conn):
        return
    if conn._client_kexinit is kexinits[0]:
        conn._client_kexinit = b""
    if conn._server_kexinit is kexinits[1]:
        conn._server_kexinit = b""
    if not conn._can_send_ext_info:
        conn._extensions_to_send.clear()


def _share_algorithms(conn: Any) -> None:
    for name in ("_kex_algs", "_enc_algs", "_mac_algs", "_cmp_algs", "_sig_algs", "_server_host_key_algs"):
        setattr(conn, name, _interned.get(getattr(conn, name)))


def _share_empty_sets(conn: Any) -> None:
    for name in _READ_ONLY_SETS:
        value = getattr(conn, name)
        if type(value) is set and not value:
            setattr(conn, name, _NOTHING)
    for name in _READ_ONLY_LISTS:
        value = getattr(conn, name)
        if type(value) is list and not value:
            setattr(conn, name, ())


def _lists_as_tuples(conn: Any, names: tuple[str, ...]) -> None:
    for name in names:
        value = getattr(conn, name)
        if type(value) is list:
            setattr(conn, name, tuple(value))


def after_client_auth(conn: Any) -> None:
    """The upstream connection is authenticated: its own options give way to the shared session defaults,
    its algorithm lists to shared ones, and the runner's signature algorithms (read only to authenticate)
    go."""
    if not _usable(conn) or not conn._auth_complete:
        return
    conn._options = _interned.get(SessionDefaults(conn._options))
    conn._server_sig_algs = _NOTHING
    _share_algorithms(conn)
    _share_empty_sets(conn)
    _lists_as_tuples(conn, _AUTH_LISTS + _CLIENT_AUTH_LISTS)
    if conn._wait is None and conn._waiter is not None and conn._waiter.done():
        conn._waiter = None  # connected: asyncssh sets and reads it only while it still waits (`_wait`)
    share_constants(conn)


# What `share_constants` may move from an object's own dict to its class: values that cannot change in
# place, so that an object reading its class's copy reads what it held. (Floats are left out: 0.0 and
# -0.0 are equal but not the same.)
_CONSTANT_TYPES = (type(None), bool, int, str, bytes)


def _constant(value: Any) -> bool:
    kind = type(value)
    if kind in _CONSTANT_TYPES:
        return True
    return (kind is tuple or kind is frozenset) and all(_constant(item) for item in value)


def _same(shared: Any, value: Any) -> bool:
    return shared is value or (type(shared) is type(value) and shared == value)


def share_constants(obj: Any, *, settled: bool = False) -> None:
    """Move the attributes `obj` holds with the same value as every other object of its class to the class.

    asyncssh's connections have ~150 attributes and its channels ~40; their dicts are sized for that (a
    connection's is 3.3 KB), and most hold the same constant for every connection (flags, limits, names
    of negotiated algorithms). An attribute of the class with an equal constant value reads the same;
    a write puts the instance's own value back in its dict, which is all asyncssh ever does with them
    (it never deletes one, nor tests whether one exists). Only classes of the gateway's own take part
    (`shares_constants`), and only names none of their classes define. A `settled` object (bridged: what
    an idle attached session holds from then on) gives the class a value for a name it has none for;
    other calls (after authentication, after each key exchange, which writes ~20 of them again) only let
    go of what the class has. The dict is rebuilt at the size of what is left. Objects lent by `_interned`
    (shared anyway, kept for the process's life) move too."""
    cls = type(obj)
    if not cls.__dict__.get("shares_constants", False):
        return
    shared: dict[str, Any] = cls.__dict__.get("_shared_constants") or {}
    if not shared:
        cls._shared_constants = shared
    own = obj.__dict__
    kept: dict[str, Any] = {}
    for name, value in own.items():
        if name in shared:
            if _same(shared[name], value):
                continue
        elif settled and (_constant(value) or _interned.holds(value)) and not hasattr(cls, name):
            setattr(cls, name, value)
            shared[name] = value
            continue
        kept[name] = value
    if len(kept) < len(own):
        obj.__dict__ = kept  # a new dict, sized for what is left (the old one does not shrink)


def after_new_keys(conn: Any) -> None:
    """A key exchange is over (the peer's NEWKEYS processed): what it wrote again that the class holds goes."""
    share_constants(conn)


def after_server_auth(conn: Any, listener_options: Any) -> None:
    """A client connection is authenticated: the copy of the listener's options asyncssh made when
    authentication began (to re-read its config for this user, which the gateway has none of) gives way
    to the listener's own; asyncssh reads neither again."""
    if not _usable(conn) or not conn._auth_complete:
        return
    conn._options = listener_options
    _share_algorithms(conn)
    _share_empty_sets(conn)
    _lists_as_tuples(conn, _AUTH_LISTS)
    share_constants(conn)
