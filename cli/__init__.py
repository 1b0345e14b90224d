"""The parts of the `sleeptime` command line; `run.py` parses the arguments and dispatches.

Each module holds one concern, over the public runtime API only (`actors.Runtime`):

- `command`: what every command shares: its exit codes, its own error, the name it runs by.
- `options`: the option types, the help formatter and the option groups commands share.
- `tables`: laying out what the commands print (aligned columns, short ids, durations).
- `demo`: the `demo` command, a conversation that shows memory catching up.
- `inspection`: `runs`, `groups`, `check` and `migrate`, over an existing database.
- `retention`: `prune`, removing what a database no longer needs.
- `workloads`: the `simulate` and `loadtest` commands; `loadsim` drives and measures them.

Example:
    >>> from cli.tables import short_id
    >>> short_id("group-ce60df3f-6986-40c7-96fc-0b676aed11ff")
    'group-ce60df3f'
"""
