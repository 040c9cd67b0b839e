"""Where a rate budget lives when it is shared: a ledger on this host (the default).

The limits belong to an app registration in a tenant, per API, not to a process: tonight's
batch, an operator's ad-hoc run and a ``verify`` on the same app draw on the same 100 a minute
and 1,500 an hour. A shared budget is the throttle's rule (:mod:`bulkoffboard.throttle`: a
sliding log a window, each grant holding its place for the window plus the larger of the
margin and its own round trip, an unanswered grant until its answer or the answer timeout)
applied to the grants of every process that draws on it, kept in one place and changed
atomically:

- **the grant**: under the ledger's lock, the rule over every grant recorded there decides;
  the new grant is recorded with the ledger's clock, never earlier than the grant before it,
  so grants stay FIFO across processes and the throttle's proof holds for their union;
- **the answer**: the caller reports its round trip, which bounds that grant's arrival for
  every process (until then the grant holds its place for the answer timeout, so a process
  killed while holding grants blocks the others for at most that long);
- **a 429**: pauses every process on the budget until its Retry-After.

The ledger is a directory (``$XDG_STATE_HOME/bulkoffboard/budget``, else
``~/.local/state/bulkoffboard/budget``, or ``--budget DIR``) with one JSON file a budget,
named by call kind and a digest of (API host, tenant, client): written whole to a temporary
file and renamed over, under an ``flock`` on a lock file beside it. Its clock is the host's
wall clock (``time.time``), shared by every process on the host and meaningful across a
restart. A ledger that is corrupt or from a newer version is an error naming it, never a
silent reset (that could double the budget).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import math
import os
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, overload

import orjson

from bulkoffboard.errors import UsageError

#: The ledger's file format: 2 keeps the grants as four columns (ids, times, lags, pids), so a
#: read makes four lists, not one a grant (format 1, a list a grant, is still read).
FORMAT = 2
TOOL = "bulkoffboard-budget"
#: Call kinds, each with its own budget (the API's limits are per endpoint).
KINDS = ("offboard", "reads", "hunting", "cancel", "tags")


class BudgetError(UsageError):
    """A shared budget cannot be used (a corrupt or newer ledger, an unreachable store)."""


@dataclass(frozen=True, slots=True)
class BudgetKey:
    """Whose budget: an app registration in a tenant, on one API host, for one call kind."""

    api_url: str
    tenant_id: str
    client_id: str
    kind: str

    @property
    def host(self) -> str:
        """The API host (a scheme and port do not make another budget... except the port,
        which tells emulators apart)."""
        parts = urllib.parse.urlsplit(self.api_url)
        return (parts.netloc or self.api_url).lower()

    def slug(self) -> str:
        """A file-name-safe name: the kind and a digest of host, tenant and client."""
        ident = f"{self.host}|{self.tenant_id.lower()}|{self.client_id.lower()}"
        digest = hashlib.sha256(ident.encode()).hexdigest()[:24]
        return f"{self.kind}-{digest}"


@dataclass(frozen=True, slots=True)
class Window:
    """One limit as the rule needs it: at most ``calls`` in ``period_s``, widened by
    ``margin_s`` at least."""

    calls: int
    period_s: float
    margin_s: float


def next_free(grants: Sequence[Sequence[Any]], window: Window, answer_timeout_s: float) -> float:
    """The rule for one window over ``grants`` (``(id, at, lag)``, oldest first; ``lag``
    None or NaN while unanswered): the earliest time one more grant keeps the window within
    its limit. The grant about to leave the window holds it for ``period + max(margin, its
    own lag)``, its lag being the answer timeout while it is unanswered."""
    if len(grants) < window.calls:
        return -math.inf
    grant = grants[len(grants) - window.calls]
    at, lag = grant[1], grant[2]
    held = answer_timeout_s if lag is None or math.isnan(lag) else lag
    return float(at) + window.period_s + max(window.margin_s, held)


class SharedBudget(Protocol):
    """A budget kept outside the process (the throttle asks it for every grant). Its
    operations are coroutines (a store across hosts answers over the network); each is
    atomic in the store."""

    async def ready(self) -> None:
        """Check the store can be used (before any call is made); raise
        :class:`BudgetError` naming it when it cannot."""

    async def try_grant(
        self, windows: Sequence[Window], answer_timeout_s: float, grant_id: str
    ) -> float | None:
        """If every window allows one more grant now (and no pause holds), record
        ``grant_id`` and return None; else return how long to wait (seconds)."""

    async def answer(self, grant_id: str, lag_s: float) -> None:
        """The call of ``grant_id`` was answered ``lag_s`` after its grant."""

    async def pause(self, seconds: float) -> None:
        """A 429: hold every process on the budget for ``seconds`` from now."""

    async def seed(self, sends: Iterable[tuple[float, float]]) -> int:
        """Record earlier sends, each ``(seconds ago, lag)``; returns how many."""

    def describe(self) -> str:
        """Where the budget lives, for messages (never a secret)."""

    async def close(self) -> None:
        """Release the connection (if any)."""


class BudgetLostError(BudgetError):
    """The shared budget's store went away mid-run: take no new grant (resume continues)."""


def default_directory(env: dict[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/bulkoffboard/budget``, else ``~/.local/state/bulkoffboard/budget``."""
    source = os.environ if env is None else env
    state = source.get("XDG_STATE_HOME") or ""
    base = Path(state) if state.strip() else Path.home() / ".local" / "state"
    return base / "bulkoffboard" / "budget"


class LedgerFile:
    """A budget in a JSON file on this host, changed under an ``flock`` (see the module)."""

    def __init__(
        self,
        directory: Path,
        key: BudgetKey,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.key = key
        self.directory = directory
        self.path = directory / f"{key.slug()}.json"
        self._lock_path = directory / f"{key.slug()}.lock"
        self._clock = clock
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            raise BudgetError(
                f"cannot create the budget ledger's folder {directory}: {exc.strerror}"
            ) from None
        with self._locked() as state:  # a corrupt or newer ledger fails now, before any call
            del state

    def __repr__(self) -> str:
        return f"LedgerFile({str(self.path)!r}, kind={self.key.kind!r})"

    def describe(self) -> str:
        """The ledger's path."""
        return str(self.path)

    def clock(self) -> float:
        """The host's wall clock (the same in every process)."""
        return self._clock()

    # -- the operations ----------------------------------------------------------------------

    async def ready(self) -> None:
        """Checked when opened already."""

    async def close(self) -> None:
        """Nothing to release (the lock is taken and dropped at each operation)."""

    async def try_grant(
        self, windows: Sequence[Window], answer_timeout_s: float, grant_id: str
    ) -> float | None:
        """See :meth:`SharedBudget.try_grant` (a file lock held for a moment: no await)."""
        return self.grant_now(windows, answer_timeout_s, grant_id)

    async def answer(self, grant_id: str, lag_s: float) -> None:
        """See :meth:`SharedBudget.answer`."""
        self.answer_now(grant_id, lag_s)

    async def pause(self, seconds: float) -> None:
        """See :meth:`SharedBudget.pause`."""
        self.pause_now(seconds)

    async def seed(self, sends: Iterable[tuple[float, float]]) -> int:
        """See :meth:`SharedBudget.seed`."""
        now = self.clock()
        return self.seed_now((now - ago, lag) for ago, lag in sends)

    def grant_now(
        self, windows: Sequence[Window], answer_timeout_s: float, grant_id: str
    ) -> float | None:
        """:meth:`try_grant`, synchronously."""
        with self._locked(write=True) as state:
            now = self.clock()
            grants: Grants = state["grants"]
            changed = _prune(state, now, windows, answer_timeout_s)
            changed += _answer_the_dead(grants, now)
            free = max(
                float(state.get("paused_until") or -math.inf),
                *(next_free(grants, w, answer_timeout_s) for w in windows),
            )
            if free > now:
                state["_unchanged"] = not changed
                return free - now
            last = float(grants.at[-1]) if grants else -math.inf
            grants.append(grant_id, max(now, math.nextafter(last, math.inf)), None, os.getpid())
            return None

    def answer_now(self, grant_id: str, lag_s: float) -> None:
        """:meth:`answer`, synchronously."""
        with self._locked(write=True) as state:
            grants: Grants = state["grants"]
            index = grants.find(grant_id)
            if index < 0 or grants.lag[index] is not None:
                state["_unchanged"] = True  # pruned already, or answered: nothing to note
                return
            grants.lag[index] = max(float(lag_s), 0.0)

    def pause_now(self, seconds: float) -> None:
        """:meth:`pause`, synchronously."""
        with self._locked(write=True) as state:
            until = self.clock() + max(seconds, 0.0)
            state["paused_until"] = max(float(state.get("paused_until") or 0.0), until)

    def seed_now(self, sends: Iterable[tuple[float, float]]) -> int:
        """Record earlier sends ``(ledger-clock time, lag)`` as grants already answered,
        unless a grant at that very time is recorded already."""
        wanted = sorted(sends)
        if not wanted:
            return 0
        with self._locked(write=True) as state:
            grants: Grants = state["grants"]
            known = {float(at) for at in grants.at}
            added = [
                [f"seed-{os.getpid()}-{n}", at, max(lag, 0.0), 0]
                for n, (at, lag) in enumerate(wanted)
                if at not in known
            ]
            rows = sorted([*grants.rows(), *added], key=lambda g: float(g[1]))
            state["grants"] = Grants.of(rows)
            return len(added)

    def grants(self) -> list[tuple[str, float, float]]:
        """Every grant recorded (id, time, lag; NaN while unanswered), oldest first."""
        with self._locked() as state:
            return [
                (str(g[0]), float(g[1]), math.nan if g[2] is None else float(g[2]))
                for g in state["grants"].rows()
            ]

    # -- the file ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, *, write: bool = False) -> Iterator[dict[str, Any]]:
        """The ledger's state under its lock; written back (whole, then renamed over) unless
        the block marked it ``_unchanged``."""
        try:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise BudgetError(
                f"cannot open the budget ledger's lock {self._lock_path}: {exc.strerror}"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            state = self._read()
            yield state
            if write and not state.pop("_unchanged", False):
                self._write(state)
        finally:
            os.close(fd)  # closing drops the flock

    def _read(self) -> dict[str, Any]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return {"format": FORMAT, "tool": TOOL, "grants": Grants(), "paused_until": None}
        except OSError as exc:
            raise BudgetError(
                f"cannot read the budget ledger {self.path}: {exc.strerror}"
            ) from None
        try:
            state = orjson.loads(data)
        except orjson.JSONDecodeError:
            raise BudgetError(
                f"the budget ledger {self.path} is corrupt (not JSON): move it aside once no "
                "bulkoffboard uses it (a silent reset could double the budget)"
            ) from None
        if not isinstance(state, dict) or state.get("tool") != TOOL:
            raise BudgetError(f"{self.path} is not a bulkoffboard budget ledger")
        version = state.get("format")
        if not isinstance(version, int) or version > FORMAT:
            raise BudgetError(
                f"the budget ledger {self.path} was written by a newer bulkoffboard (format "
                f"{version!r}); upgrade bulkoffboard on every runner that shares it"
            )
        grants = Grants.load(state)
        if grants is None:
            raise BudgetError(
                f"the budget ledger {self.path} is corrupt (its grants): move it aside once no "
                "bulkoffboard uses it"
            )
        for column in Grants.COLUMNS:
            state.pop(column, None)
        state["grants"] = grants
        return state

    def _write(self, state: dict[str, Any]) -> None:
        temp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            grants: Grants = state["grants"]
            document = {k: v for k, v in state.items() if k != "grants"} | {"format": FORMAT}
            temp.write_bytes(orjson.dumps(document | grants.columns()))
            temp.replace(self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise BudgetError(
                f"cannot write the budget ledger {self.path}: {exc.strerror}"
            ) from None


_NUMBER = (int, float)
_LAG = (int, float, type(None))


def _all_grants(grants: list[Any]) -> bool:
    """Format 1: each grant is ``[id, at, lag or None, pid]`` (the pid of the process that
    holds it; 0: none)."""
    for grant in grants:
        if type(grant) is not list or len(grant) != 4:
            return False
        grant_id, at, lag, pid = grant
        if (
            type(grant_id) is not str
            or type(at) not in _NUMBER
            or type(lag) not in _LAG
            or type(pid) is not int
        ):
            return False
    return True


class Grants(Sequence[tuple[str, float, "float | None", int]]):
    """The grants of a ledger, oldest first, as four columns: ``ids``, ``at`` (ledger-clock
    times), ``lag`` (the answered round trip; None while unanswered) and ``pid`` (the process
    that holds it; 0: none). A grant reads as ``(id, at, lag, pid)``, so :func:`next_free`
    takes the columns as it takes any sequence of grants.

    Format 2 of the file keeps the columns as they are: a read makes four lists instead of one
    a grant, which at the hour window's 1,500 grants was most of a grant's cost (and set off
    a full garbage collection every 45 grants)."""

    COLUMNS = ("ids", "at", "lag", "pid")
    __slots__ = ("at", "ids", "lag", "pid")

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.at: list[float] = []
        self.lag: list[float | None] = []
        self.pid: list[int] = []

    @classmethod
    def of(cls, rows: Iterable[Sequence[Any]]) -> Grants:
        """From format 1's rows ``[id, at, lag, pid]``."""
        grants = cls()
        for grant_id, at, lag, pid in rows:
            grants.append(grant_id, at, lag, pid)
        return grants

    @classmethod
    def load(cls, state: dict[str, Any]) -> Grants | None:
        """The grants of a ledger's state in either format; None when they are not well
        formed (the caller names the file)."""
        if state.get("format") == 1:
            rows = state.get("grants")
            if not isinstance(rows, list) or not _all_grants(rows):
                return None
            return cls.of(rows)
        ids, at, lag, pid = (state.get(name) for name in cls.COLUMNS)
        if not (
            isinstance(ids, list)
            and isinstance(at, list)
            and isinstance(lag, list)
            and isinstance(pid, list)
            and len(ids) == len(at) == len(lag) == len(pid)
        ):
            return None
        # Each column checked in one pass in C (map, set): a Python loop a grant cost about
        # as much as the JSON parse itself.
        if (
            not set(map(type, ids)) <= {str}
            or not set(map(type, at)) <= {int, float}
            or not set(map(type, lag)) <= {int, float, type(None)}
            or not set(map(type, pid)) <= {int}
        ):
            return None
        grants = cls()
        grants.ids, grants.at, grants.lag, grants.pid = ids, at, lag, pid
        return grants

    def columns(self) -> dict[str, list[Any]]:
        """The columns, as format 2 writes them."""
        return {"ids": self.ids, "at": self.at, "lag": self.lag, "pid": self.pid}

    def rows(self) -> list[list[Any]]:
        """``[id, at, lag, pid]`` a grant, oldest first."""
        return [list(row) for row in zip(self.ids, self.at, self.lag, self.pid, strict=True)]

    def append(self, grant_id: str, at: float, lag: float | None, pid: int) -> None:
        self.ids.append(grant_id)
        self.at.append(at)
        self.lag.append(lag)
        self.pid.append(pid)

    def cut(self, count: int) -> None:
        """Drop the ``count`` oldest grants."""
        del self.ids[:count], self.at[:count], self.lag[:count], self.pid[:count]

    def find(self, grant_id: str) -> int:
        """The index of ``grant_id`` (searched from the newest: an answer follows its grant
        closely), or -1."""
        ids = self.ids
        for index in range(len(ids) - 1, -1, -1):
            if ids[index] == grant_id:
                return index
        return -1

    def __len__(self) -> int:
        return len(self.ids)

    @overload
    def __getitem__(self, index: int) -> tuple[str, float, float | None, int]: ...

    @overload
    def __getitem__(self, index: slice) -> list[tuple[str, float, float | None, int]]: ...

    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return (self.ids[index], self.at[index], self.lag[index], self.pid[index])


def _answer_the_dead(grants: Grants, now: float) -> int:
    """A grant still unanswered whose process is gone (killed) was answered by now at the
    latest: its call was on the wire when the process died, and the bound is the one a
    resumed journal uses for its own in-flight calls. Without it a kill would hold the
    grant for the whole answer timeout. (A reused pid only makes this more careful.)"""
    me = os.getpid()
    answered = 0
    lags, pids, times = grants.lag, grants.pid, grants.at
    for index, lag in enumerate(lags):
        if lag is None and pids[index] not in (0, me) and not _alive(pids[index]):
            lags[index] = max(now - float(times[index]), 0.0)
            answered += 1
    return answered


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's: alive
    return True


def _prune(
    state: dict[str, Any], now: float, windows: Sequence[Window], answer_timeout_s: float
) -> int:
    """Drop the grants no window of any runner can still count: beyond the most calls a
    window holds, or older than the longest window plus the larger of the widest margin and
    the grant's own lag (the answer timeout while unanswered). Runners on one budget may use
    other limits (a test's scaled ones): the ledger keeps the largest of each any of them
    asked for."""
    keep = {
        "keep_period": max(w.period_s for w in windows),
        "keep_margin": max(w.margin_s for w in windows),
        "keep_timeout": answer_timeout_s,
        "keep_n": max(w.calls for w in windows),
    }
    changed = 0
    for name, value in keep.items():
        merged = max(float(state.get(name) or 0.0), value)
        if merged != state.get(name):
            state[name] = int(merged) if name == "keep_n" else merged
            changed = 1
    period, margin = float(state["keep_period"]), float(state["keep_margin"])
    timeout = float(state["keep_timeout"])
    grants: Grants = state["grants"]
    times, lags = grants.at, grants.lag
    cut = 0
    over = len(grants) - int(state["keep_n"])
    while cut < len(times):
        at, lag = float(times[cut]), lags[cut]
        held = timeout if lag is None else float(lag)
        if cut >= over and at + period + max(margin, held) >= now:
            break
        cut += 1
    if cut:
        grants.cut(cut)
    if state.get("paused_until") is not None and float(state["paused_until"]) < now:
        state["paused_until"] = None
        changed += 1
    return changed + cut


def label(spec: str | None, key: BudgetKey) -> str:
    """What a journal's ``session`` record says of the budget it drew on: ``none``, or the
    ledger file (a resume seeds its throttle from the journal only when the sends there are
    not in the ledger it uses now)."""
    if spec is None or spec.strip().lower() == "none":
        return "none"
    text = spec.strip()
    if text.startswith(("redis://", "rediss://")):
        parts = urllib.parse.urlsplit(text)
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}{parts.path} {key.slug()}"
    directory = default_directory() if text == "default" else Path(text).expanduser()
    return str((directory / f"{key.slug()}.json").absolute())


# -- many hosts: Redis --------------------------------------------------------------------------

#: The rule of :func:`next_free` and the pruning of :func:`_prune`, in one atomic script.
#: KEYS: the grants (a sorted set: member the grant id, score its time), their lags (a hash),
#: the budget's meta (a hash: paused_until, keep_*). Times come from the server's clock
#: (TIME), the one every host agrees on; scores go in with microseconds.
_PRUNE_LUA = """
local function now_s()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function num(value, default)
  if value then return tonumber(value) end
  return default
end
local function prune(now)
  local kp = num(redis.call('HGET', KEYS[3], 'keep_period'), 0)
  local km = num(redis.call('HGET', KEYS[3], 'keep_margin'), 0)
  local kt = num(redis.call('HGET', KEYS[3], 'keep_timeout'), 0)
  local kn = num(redis.call('HGET', KEYS[3], 'keep_n'), 0)
  local count = redis.call('ZCARD', KEYS[1])
  while count > 0 do
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    local held = num(redis.call('HGET', KEYS[2], oldest[1]), kt)
    if count <= kn and tonumber(oldest[2]) + kp + math.max(km, held) >= now then break end
    redis.call('ZREM', KEYS[1], oldest[1])
    redis.call('HDEL', KEYS[2], oldest[1])
    count = count - 1
  end
  local paused = redis.call('HGET', KEYS[3], 'paused_until')
  if paused and tonumber(paused) < now then redis.call('HDEL', KEYS[3], 'paused_until') end
  return count, kp + math.max(km, kt)
end
local function expire(reach)
  local ttl = math.ceil(reach + 60)
  for i = 1, 3 do redis.call('EXPIRE', KEYS[i], ttl) end
end
"""

_GRANT_LUA = (
    _PRUNE_LUA
    + """
local now = now_s()
local timeout = tonumber(ARGV[2])
local n = tonumber(ARGV[3])
local kp = num(redis.call('HGET', KEYS[3], 'keep_period'), 0)
local km = num(redis.call('HGET', KEYS[3], 'keep_margin'), 0)
local kt = math.max(num(redis.call('HGET', KEYS[3], 'keep_timeout'), 0), timeout)
local kn = num(redis.call('HGET', KEYS[3], 'keep_n'), 0)
local windows = {}
for i = 0, n - 1 do
  local w = {tonumber(ARGV[4 + 3 * i]), tonumber(ARGV[5 + 3 * i]), tonumber(ARGV[6 + 3 * i])}
  windows[#windows + 1] = w
  kn = math.max(kn, w[1]); kp = math.max(kp, w[2]); km = math.max(km, w[3])
end
redis.call('HSET', KEYS[3], 'keep_period', string.format('%.6f', kp),
  'keep_margin', string.format('%.6f', km), 'keep_timeout', string.format('%.6f', kt),
  'keep_n', kn)
local count, reach = prune(now)
local free = num(redis.call('HGET', KEYS[3], 'paused_until'), -1)
for _, w in ipairs(windows) do
  if count >= w[1] then
    local g = redis.call('ZRANGE', KEYS[1], count - w[1], count - w[1], 'WITHSCORES')
    local held = num(redis.call('HGET', KEYS[2], g[1]), timeout)
    free = math.max(free, tonumber(g[2]) + w[2] + math.max(w[3], held))
  end
end
if free > now then return string.format('%.6f', free - now) end
local at = now
local last = redis.call('ZRANGE', KEYS[1], -1, -1, 'WITHSCORES')
if last[2] and tonumber(last[2]) + 0.000001 > at then at = tonumber(last[2]) + 0.000001 end
redis.call('ZADD', KEYS[1], string.format('%.6f', at), ARGV[1])
expire(reach)
return false
"""
)

_ANSWER_LUA = """
if redis.call('ZSCORE', KEYS[1], ARGV[1]) and redis.call('HEXISTS', KEYS[2], ARGV[1]) == 0 then
  redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
end
return false
"""

_PAUSE_LUA = (
    _PRUNE_LUA
    + """
local until_ = now_s() + tonumber(ARGV[1])
local paused = tonumber(redis.call('HGET', KEYS[3], 'paused_until') or '0')
if until_ > paused then
  redis.call('HSET', KEYS[3], 'paused_until', string.format('%.6f', until_))
end
expire(until_ - now_s() + 3600)
return false
"""
)

_SEED_LUA = (
    _PRUNE_LUA
    + """
local now = now_s()
local added = 0
for i = 2, #ARGV, 2 do
  local id = ARGV[1] .. '-' .. i
  redis.call('ZADD', KEYS[1], string.format('%.6f', now - tonumber(ARGV[i])), id)
  redis.call('HSET', KEYS[2], id, ARGV[i + 1])
  added = added + 1
end
expire(7200)
return added
"""
)


class RedisBudget:
    """A budget in Redis, shared by runners on many hosts: the same rule, run atomically in
    the server by a script, on the server's clock. Keys are namespaced by call kind and a
    digest of API host, tenant and client, and expire on their own. The password comes from
    the URL or ``BULKOFFBOARD_REDIS_PASSWORD`` and is never shown."""

    def __init__(self, url: str, key: BudgetKey, *, env: dict[str, str] | None = None) -> None:
        import redis.asyncio as aioredis  # noqa: PLC0415 - only runners that use Redis load it

        source = os.environ if env is None else env
        parts = urllib.parse.urlsplit(url)
        self._password = parts.password or source.get("BULKOFFBOARD_REDIS_PASSWORD") or None
        host = parts.hostname or "localhost"
        port = f":{parts.port}" if parts.port else ""
        #: The URL without its credentials: what messages show.
        self.where = f"{parts.scheme}://{host}{port}{parts.path}"
        self.key = key
        self._client = aioredis.Redis.from_url(
            url,
            password=self._password,
            socket_timeout=10,
            socket_connect_timeout=5,
        )
        prefix = f"bulkoffboard:budget:{key.slug()}"
        self._keys = [f"{prefix}:grants", f"{prefix}:lags", f"{prefix}:meta"]
        self._grant = self._client.register_script(_GRANT_LUA)
        self._answer = self._client.register_script(_ANSWER_LUA)
        self._pause = self._client.register_script(_PAUSE_LUA)
        self._seed = self._client.register_script(_SEED_LUA)

    def __repr__(self) -> str:
        return f"RedisBudget({self.where!r}, kind={self.key.kind!r})"

    def describe(self) -> str:
        """The Redis URL without credentials, and the budget's keys."""
        return f"{self.where} {self._keys[0].removesuffix(':grants')}"

    def _problem(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split()) or type(exc).__name__
        if self._password:
            text = text.replace(self._password, "***")
        return text

    async def ready(self) -> None:
        """Reach the server (exit 2 before any call when it cannot be reached)."""
        from redis.exceptions import RedisError  # noqa: PLC0415

        try:
            await self._client.ping()
        except (RedisError, OSError) as exc:
            raise BudgetError(
                f"the shared budget at {self.where} is unreachable: {self._problem(exc)}"
            ) from None

    async def _run(self, script: Any, args: list[Any]) -> Any:
        from redis.exceptions import RedisError  # noqa: PLC0415

        try:
            return await script(keys=self._keys, args=args)
        except (RedisError, OSError) as exc:
            raise BudgetLostError(
                f"the shared budget at {self.where} went away: {self._problem(exc)}"
            ) from None

    async def try_grant(
        self, windows: Sequence[Window], answer_timeout_s: float, grant_id: str
    ) -> float | None:
        """See :meth:`SharedBudget.try_grant`."""
        args: list[Any] = [grant_id, repr(answer_timeout_s), len(windows)]
        for window in windows:
            args += [window.calls, repr(window.period_s), repr(window.margin_s)]
        held = await self._run(self._grant, args)
        return None if held is None else float(held)

    async def answer(self, grant_id: str, lag_s: float) -> None:
        """See :meth:`SharedBudget.answer`."""
        await self._run(self._answer, [grant_id, repr(max(lag_s, 0.0))])

    async def pause(self, seconds: float) -> None:
        """See :meth:`SharedBudget.pause`."""
        await self._run(self._pause, [repr(max(seconds, 0.0))])

    async def seed(self, sends: Iterable[tuple[float, float]]) -> int:
        """See :meth:`SharedBudget.seed`."""
        args: list[Any] = [f"seed-{os.getpid()}-{time.time_ns()}"]
        for ago, lag in sends:
            args += [repr(max(ago, 0.0)), repr(max(lag, 0.0))]
        if len(args) == 1:
            return 0
        return int(await self._run(self._seed, args))

    async def close(self) -> None:
        """Close the connection pool."""
        await self._client.aclose()


def open_budget(spec: str | None, key: BudgetKey) -> SharedBudget | None:
    """The budget ``spec`` names for ``key``: None or ``"none"``: private to the process
    (None is returned); a directory: a ledger there (``"default"``: the user's state
    directory). Raises :class:`BudgetError` when it cannot be used."""
    if spec is None or spec.strip().lower() == "none":
        return None
    if key.kind not in KINDS:
        raise ValueError(f"unknown call kind {key.kind!r}")
    text = spec.strip()
    if text.startswith(("redis://", "rediss://")):
        return RedisBudget(text, key)
    directory = default_directory() if text == "default" else Path(text).expanduser()
    return LedgerFile(directory, key)


__all__ = [
    "FORMAT",
    "KINDS",
    "BudgetError",
    "BudgetKey",
    "BudgetLostError",
    "LedgerFile",
    "RedisBudget",
    "SharedBudget",
    "Window",
    "default_directory",
    "label",
    "next_free",
    "open_budget",
]
