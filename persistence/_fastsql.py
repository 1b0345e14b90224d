"""The writer's merged statements, executed without SQLAlchemy's per-row bookkeeping.

Why it exists: for each row of an executemany, `Connection.execute` builds a dict of every
bind parameter (`construct_params`), then a list of them through the bind processors, in
generic code that costs the single writer thread more than SQLite does for the row. Here a
statement is compiled once per set of row keys, and each row becomes the driver's
parameters in one short loop: where each value comes from and its bind processor are
looked up once, when the statement is compiled. The SQL, the processors (so `UTCDateTime`,
JSON and every other type convert exactly as before) and the driver call are SQLAlchemy's:

- `ClauseElement.compile(dialect=..., column_keys=..., for_executemany=...)`, as
  `Connection.execute` compiles the statement, and the compiled statement's `string`,
  `positional`, `positiontup`, `bind_names` and `escaped_bind_names`;
- `TypeEngine.dialect_impl(dialect).bind_processor(dialect)`, the processor
  `Connection.execute` applies to each value (taken to be a function of the value, as
  SQLAlchemy's are: None is processed once, when the statement is compiled);
- `Connection.exec_driver_sql`, so the transaction, the wrapping of driver errors (a
  `DBAPIError`, with `connection_invalidated` when the driver says the connection is
  gone), the invalidation of a lost connection and the `rowcount` stay SQLAlchemy's.

What this would not do exactly as `Connection.execute` does goes through it instead: a
statement whose compiled form computes defaults in Python, returns rows or expands
parameters; rows whose keys are not the first row's; and rows a bind processor refuses
(e.g. a naive datetime), so that the error raised is SQLAlchemy's own.

Example:
    >>> executor = FastExecutor(engine.dialect)
    >>> executor.execute(connection, update(runs).where(...), rows)  # -> the rowcount
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from operator import itemgetter
from typing import Any

from sqlalchemy import Connection, Delete, Insert, Update
from sqlalchemy.engine import BindTyping, Dialect
from sqlalchemy.sql.compiler import SQLCompiler

Processor = Callable[[Any], Any]
Getter = Callable[[Any], Any]
Rows = Sequence[Mapping[str, Any]]
Dml = Insert | Update | Delete

MAX_PLANS = 256
"""Statements (per set of row keys) whose plan is kept; more means statements that are
built anew for each write, which gain nothing from a plan anyway."""


class _OtherKeys(Exception):
    """A row has other keys than the first: only `Connection.execute` knows what to do."""


def _getter(indexes: Sequence[Any]) -> Getter:
    """itemgetter that returns a tuple whatever the number of items."""
    if not indexes:
        return lambda values: ()
    if len(indexes) == 1:
        (only,) = indexes
        return lambda values: (values[only],)
    return itemgetter(*indexes)


class _Plan:
    """How rows become the driver's parameters for one compiled statement.

    Per row: the row's value for each bind that takes one (a bind the SQL uses twice,
    once), through its processor if it has one, then the values the statement fixes,
    then all of them in the SQL's order (a tuple) or named (a dict, for a named
    paramstyle).
    """

    __slots__ = ("_arrange", "_fixed", "_get", "_keys", "_names", "_processed", "sql")

    def __init__(
        self,
        sql: str,
        keys: frozenset[str],
        row_keys: list[str],
        processed: list[tuple[int, Processor, Any]],
        fixed: list[Any],
        order: list[int],
        names: list[str] | None,
    ) -> None:
        self.sql = sql
        self._keys = keys
        self._get = _getter(row_keys)  # a row's values, one per bind that takes one
        self._processed = processed  # (index among those, processor, what it makes of None)
        self._fixed = fixed  # the values of the binds the statement fixes, processed
        in_order = order == list(range(len(row_keys) + len(fixed)))
        self._arrange = None if in_order else _getter(order)
        self._names = names  # None: positional parameters

    def parameters(self, rows: Rows) -> list[Any]:
        """The rows as the driver's parameters; raises _OtherKeys, or what a processor
        raises."""
        keys, get, processed, fixed, arrange = (
            self._keys,
            self._get,
            self._processed,
            self._fixed,
            self._arrange,
        )
        built: list[Any] = []
        for row in rows:
            if row.keys() != keys:
                raise _OtherKeys()
            values = list(get(row))
            for index, process, none in processed:
                value = values[index]
                values[index] = none if value is None else process(value)
            if fixed:
                values += fixed
            built.append(tuple(values) if arrange is None else arrange(values))
        if self._names is None:
            return built
        names = self._names
        return [dict(zip(names, values, strict=True)) for values in built]


class FastExecutor:
    """Runs INSERTs, UPDATEs and DELETEs of many rows with less work per row than
    `Connection.execute`: the same statements, values, errors and rowcount.

    Used by one thread (the writer's): its plans are not shared.
    """

    def __init__(self, dialect: Dialect) -> None:
        self._dialect = dialect
        # Only execute() binds values through setinputsizes() (e.g. cx_Oracle).
        self._enabled = dialect.bind_typing is not BindTyping.SETINPUTSIZES
        self._plans: dict[tuple[Dml, frozenset[str], bool], _Plan | None] = {}

    def execute(self, connection: Connection, statement: Dml, rows: Rows) -> int:
        """Execute `statement` once per row (an executemany); return the rows it matched."""
        if not rows:
            return 0
        plan = self._plan(statement, frozenset(rows[0].keys()), len(rows) > 1)
        if plan is not None:
            try:
                parameters = plan.parameters(rows)
            except Exception:  # execute() below raises SQLAlchemy's own error
                pass
            else:
                return connection.exec_driver_sql(plan.sql, parameters).rowcount
        return connection.execute(statement, list(rows)).rowcount

    def _plan(self, statement: Dml, keys: frozenset[str], many: bool) -> _Plan | None:
        cache_key = (statement, keys, many)
        try:
            return self._plans[cache_key]
        except KeyError:
            pass
        plan = None
        if self._enabled and not statement.get_execution_options():
            # As Connection.execute compiles it: for the first row's keys, sorted; for one
            # row, an execute (which may add RETURNING, then left to Connection.execute).
            compiled = statement.compile(
                dialect=self._dialect, column_keys=sorted(keys), for_executemany=many
            )
            assert isinstance(compiled, SQLCompiler)
            plan = _make_plan(compiled, keys, self._dialect)
        if len(self._plans) >= MAX_PLANS:
            self._plans.clear()
        self._plans[cache_key] = plan
        return plan


def _make_plan(compiled: SQLCompiler, keys: frozenset[str], dialect: Dialect) -> _Plan | None:
    """The plan of a compiled statement for rows with `keys`, or None when only
    `Connection.execute` runs it exactly."""
    if (
        compiled.insert_prefetch
        or compiled.update_prefetch
        or compiled.effective_returning
        or compiled.literal_execute_params
        or compiled.post_compile_params
    ):
        return None
    binds = {name: bind for bind, name in compiled.bind_names.items()}
    if compiled.positional:
        assert compiled.positiontup is not None
        in_sql = list(compiled.positiontup)  # a name used twice is there twice
        names = None
    else:
        in_sql = list(binds)
        names = [compiled.escaped_bind_names.get(name, name) for name in in_sql]
    from_row: list[str] = []  # bind names whose value is the row's...
    row_keys: list[str] = []  # ...under this key
    processed: list[tuple[int, Processor, Any]] = []
    from_statement: list[str] = []
    fixed: list[Any] = []
    try:
        for name in dict.fromkeys(in_sql):
            bind = binds[name]
            process = bind.type.dialect_impl(dialect).bind_processor(dialect)
            # Where construct_params looks: the row's value under the bind's key, then
            # under its compiled name; else the statement's value, unless one is required.
            key = bind.key if bind.key in keys else name if name in keys else None
            if key is not None:
                if process is not None:
                    processed.append((len(from_row), process, process(None)))
                from_row.append(name)
                row_keys.append(key)
            elif bind.required or bind.callable is not None:
                return None
            else:
                from_statement.append(name)
                fixed.append(bind.value if process is None else process(bind.value))
    except Exception:  # a processor refuses None, or the statement's own value
        return None
    slot = {name: index for index, name in enumerate(from_row + from_statement)}
    order = [slot[name] for name in in_sql]
    return _Plan(compiled.string, keys, row_keys, processed, fixed, order, names)
