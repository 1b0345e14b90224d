"""The command line's option types, its help formatter, and the option groups commands share.

A type here refuses a bad value while the arguments are parsed, so a typo gets argparse's
usage and exit code 2 before anything is opened or created.

Example:
    >>> positive_int("3"), frequency_option("none")
    (3, None)
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from actors import DEFAULT_MAX_ACTIVE_GROUPS, DEFAULT_PASSIVATE_AFTER
from cli import loadsim
from cli.command import CommandError

N = TypeVar("N", int, float)
LOG_LEVELS = ("debug", "info", "warning", "error")


def frequency_option(text: str) -> int | None:
    """`--frequency`: a whole number of 0 or more, or `none` for every turn."""
    if text.strip().lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = -1
    # Checked here, not only by the runtime, so a typo fails before a database is opened.
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not 0, a positive whole number, or 'none'")
    return value


def _number(
    convert: Callable[[str], N], accept: Callable[[N], bool], wanted: str
) -> Callable[[str], N]:
    """An argparse `type`: `convert` the text, refuse it unless `accept` holds."""

    def parse(text: str) -> N:
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"{text!r} is not {wanted}")
        return value

    return parse


positive_int = _number(int, lambda v: v >= 1, "a whole number of 1 or more")
MAX_GROUPS = 1_000_000
MAX_AGENTS = 1_000
group_count = _number(
    int, lambda v: 1 <= v <= MAX_GROUPS, f"a whole number from 1 to {MAX_GROUPS:,}"
)
agent_count = _number(
    int, lambda v: 1 <= v <= MAX_AGENTS, f"a whole number from 1 to {MAX_AGENTS:,}"
)
non_negative_int = _number(int, lambda v: v >= 0, "a whole number of 0 or more")
non_negative_float = _number(float, lambda v: 0 <= v < math.inf, "a number of 0 or more")
positive_float = _number(float, lambda v: 0 < v < math.inf, "a number above 0")
fraction = _number(float, lambda v: 0 <= v <= 1, "a fraction from 0 to 1")


def optional(parse: Callable[[str], N]) -> Callable[[str], N | None]:
    """An argparse `type` that also takes `none` (the runtime's None: no limit).

    >>> optional(positive_int)("none"), optional(positive_int)("3")
    (None, 3)
    """

    def parse_or_none(text: str) -> N | None:
        return None if text.strip().lower() == "none" else parse(text)

    return parse_or_none


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, with each option's default shown unless its help already says it.

    Only real defaults are shown: an option whose default is None (nothing given) or False
    (a flag) says in its own words what happens without it, if anything.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        default = action.default
        shown = action.help is None or "(default" in action.help
        if shown or default is None or default is False or default == argparse.SUPPRESS:
            return action.help
        text = f"{default:g}" if isinstance(default, float) else str(default)
        # The help is a %-format string (argparse fills %(prog)s and the like in).
        return f"{action.help} (default: {text.replace('%', '%%')})"


class CommandParser(argparse.ArgumentParser):
    """An argument parser whose help shows each option's default (see `HelpFormatter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def add_logging_options(parser: argparse.ArgumentParser, default: object) -> None:
    """The logging options, accepted before and after the command name."""
    parser.add_argument(
        "--log-level",
        choices=LOG_LEVELS,
        default=default,
        help="how much the runtime logs to stderr (default: warning, or $SLEEPTIME_LOG_LEVEL)",
    )
    parser.add_argument(
        "--log-json", action="store_true", default=default, help="log JSON lines instead of text"
    )


def add_workload_options(parser: argparse.ArgumentParser) -> None:
    """The options `simulate` and `loadtest` share: the agents, faults, database and outputs."""
    agents = parser.add_argument_group("agents (all of the built-in 'simulated' kind)")
    agents.add_argument(
        "--agents", metavar="A", type=agent_count, default=1, help="sleeptime agents per group"
    )
    agents.add_argument(
        "--frequency",
        metavar="N",
        type=frequency_option,
        default=1,
        help="fire sleeptime every N turns; 'none' for every turn, 0 for never",
    )
    agents.add_argument(
        "--latency-ms",
        metavar="MS",
        type=non_negative_float,
        default=0.0,
        help="each agent step's latency",
    )
    agents.add_argument(
        "--latency-distribution",
        choices=loadsim.DISTRIBUTIONS,
        default="constant",
        help="how step latencies spread around --latency-ms",
    )
    agents.add_argument(
        "--jitter-ms",
        metavar="MS",
        type=non_negative_float,
        default=0.0,
        help="the latency's spread: +- for constant and uniform, sigma*latency for lognormal",
    )
    agents.add_argument(
        "--failure-rate",
        metavar="P",
        type=fraction,
        default=0.0,
        help="fraction of sleeptime steps that fail (their runs end failed); the primary"
        " agent never fails",
    )
    agents.add_argument(
        "--crash-rate",
        metavar="P",
        type=fraction,
        default=0.0,
        help="fault injection: fraction of messages on which an actor crashes and is"
        " restarted by its supervisor",
    )
    agents.add_argument(
        "--seed",
        metavar="S",
        type=non_negative_int,
        default=0,
        help="seeds every agent (each its own), the arrivals and the crashes",
    )
    runtime = parser.add_argument_group("runtime and outputs")
    runtime.add_argument(
        "--db",
        metavar="URL",
        default=None,
        help="database URL (default: a new SQLite file in a temporary directory, printed)",
    )
    runtime.add_argument(
        "--workers",
        metavar="N",
        type=positive_int,
        default=32,
        help="the runtime's agent step threads",
    )
    runtime.add_argument(
        "--max-active-groups",
        metavar="N",
        type=optional(positive_int),
        default=DEFAULT_MAX_ACTIVE_GROUPS,
        help="groups with live actors at most; the least recently used beyond it are"
        " passivated (their threads given back), 'none' for no limit",
    )
    runtime.add_argument(
        "--passivate-after",
        metavar="SECONDS",
        type=optional(positive_float),
        default=DEFAULT_PASSIVATE_AFTER,
        help="passivate a group told nothing for this long, 'none' never to",
    )
    runtime.add_argument(
        "--wait-timeout",
        metavar="SECONDS",
        type=positive_float,
        default=600.0,
        help="how long to wait for the runs after the last turn",
    )
    runtime.add_argument(
        "--report", metavar="FILE.json", type=Path, help="also write the figures as JSON"
    )
    runtime.add_argument(
        "--plot",
        metavar="FILE.png",
        type=Path,
        help="also draw throughput, runs pending and latency histograms"
        f" (needs matplotlib: {loadsim.PLOT_INSTALL_HINT})",
    )
    runtime.add_argument(
        "--no-progress", action="store_true", help="no progress bar on standard error"
    )
    scale = parser.add_argument_group(
        "Ray (the ray extra): the workload fanned out over shard hosts on one PostgreSQL --db"
    )
    scale.add_argument(
        "--ray",
        metavar="N",
        type=positive_int,
        default=None,
        help="run N shard hosts as Ray actors (on a local Ray, started and stopped here,"
        " unless --ray-address) and give each its slice of the groups",
    )
    scale.add_argument(
        "--ray-address",
        metavar="ADDR",
        default=None,
        help="a running Ray cluster (auto, host:port, ray://host:10001): use the shard"
        " hosts of --ray-namespace there, starting more if --ray N asks for more",
    )
    scale.add_argument(
        "--ray-namespace",
        metavar="NAME",
        default="sleeptime",
        help="the Ray namespace of the shard hosts",
    )


def add_llm_options(parser: argparse.ArgumentParser) -> None:
    """`--llm-url`, `--model`, `--api-key-env`: LLM agents (the `openai` kind) instead."""
    llm = parser.add_argument_group(
        "LLM agents (the 'openai' kind, on any OpenAI-compatible chat-completions server)"
    )
    llm.add_argument(
        "--llm-url",
        metavar="URL",
        help="the server's base URL, e.g. http://127.0.0.1:11434/v1 (Ollama),"
        " http://127.0.0.1:8000/v1 (vLLM); the primary and sleeptime agents are then LLMs",
    )
    llm.add_argument("--model", metavar="NAME", help="the model to ask (needs --llm-url)")
    llm.add_argument(
        "--api-key-env",
        metavar="VAR",
        help="the environment variable holding the API key (local servers need none)",
    )


def llm_endpoint(args: argparse.Namespace) -> loadsim.LLMEndpoint | None:
    """The model server `--llm-url` and `--model` name, or None for the built-in agents."""
    url: str | None = getattr(args, "llm_url", None)
    model: str | None = getattr(args, "model", None)
    if url is None and model is None:
        return None
    if url is None or model is None:
        raise CommandError("--llm-url and --model go together: give both, or neither")
    return loadsim.LLMEndpoint(url, model, getattr(args, "api_key_env", None))
