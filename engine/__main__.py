"""`python -m engine <stage> [--config spec.yaml] [--field value ...]`: run one stage on this node.

Every field of the stage's spec is a flag, nested sections by dots (`--optim.lr 3e-4`), lists as
several values (`--data.blend 0.3 A 0.7 B`), through pydantic-settings' CLI, so the CLI, spec
files and Prefect parameters can never disagree. Flags override the spec file's fields.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import re
import signal
import sys
import textwrap
import threading

from engine.atomic import out_of_space
from engine.errors import LmforgeError, Preempted
from engine.metrics import system_metrics
from engine.registry import COMMANDS, STAGES, Command, get_stage
from engine.spec import load_spec

PROG = "python -m engine"


class _Parser(argparse.ArgumentParser):
    """argparse that says which flag was probably meant."""

    def error(self, message: str):
        known = [flag for action in self._actions for flag in action.option_strings]
        given = message.partition("unrecognized arguments:")[2]
        unknown = re.findall(r"(?<!\S)(--?[\w.-]+)", given)
        hints = [f"{flag}: did you mean {' or '.join(close)}?" for flag in unknown
                 if (close := difflib.get_close_matches(flag, known, n=3, cutoff=0.6))]
        lines = [f"{self.prog}: error: {message}", *hints, f"({self.prog} --help lists the flags)"]
        self.exit(2, "\n".join(lines) + "\n")


def stage_parser(stage: Command):
    """The stage's parser (its spec's fields as flags, help from their descriptions) and the
    pydantic-settings source that turns parsed flags into spec values."""
    from pydantic_settings import CliSettingsSource

    parser = _Parser(prog=f"{PROG} {stage.name}", description=stage.doc, allow_abbrev=False)
    parser.add_argument("--config", metavar="FILE",
                        help="spec file (YAML or JSON); flags override its fields")
    parser.add_argument("--log-level", default="INFO", metavar="LEVEL")
    source = CliSettingsSource(stage.spec, root_parser=parser, cli_kebab_case=True,
                               cli_implicit_flags=True, cli_avoid_json=True,
                               cli_hide_none_type=True)
    return parser, source


def _listing(commands: dict[str, Command], width: int) -> str:
    return "".join(textwrap.fill(command.doc, 100, initial_indent=f"  {name:<{width}}  ",
                                 subsequent_indent=" " * (width + 4)) + "\n"
                   for name, command in commands.items())


def _usage() -> str:
    width = max(map(len, [*STAGES, *COMMANDS]))
    return (f"usage: {PROG} STAGE [--config FILE] [--FIELD VALUE ...]\n       {PROG} STAGE "
            f"--help\n\nRuns one lmforge stage on this node.\n\nstages:\n"
            f"{_listing(STAGES, width)}\ncommands (no artifact):\n{_listing(COMMANDS, width)}")


def _stage_of(argv: list[str]) -> Command:
    """The stage or command named first; help or an error (naming the closest stage)
    otherwise."""
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), end="")
        sys.exit(0 if argv else 2)
    if argv[0] in COMMANDS:
        return COMMANDS[argv[0]]
    if argv[0] not in STAGES:
        close = difflib.get_close_matches(argv[0], [*STAGES, *COMMANDS], n=2)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        print(f"{_usage()}\nerror: unknown stage {argv[0]!r}{hint}", file=sys.stderr)
        sys.exit(2)
    return get_stage(argv[0])


def kebab_flags(argv: list[str]) -> list[str]:
    """Flags as Megatron-LM users type them (`--hidden_size_remain`) read as ours
    (`--hidden-size-remain`); values are left alone."""
    out = []
    for arg in argv:
        flag, equals, value = arg.partition("=")
        out.append(flag.replace("_", "-") + equals + value if arg.startswith("--") else arg)
    return out


class _Stopped(BaseException):
    """A stop signal reached a stage that does not hold signals itself: unwind, so that its
    temporary output is removed on the way out."""


def _stop(signum, frame) -> None:
    raise _Stopped(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    # held from the first line: a stop during start-up (imports take seconds) is a clean stop too
    previous = ({sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGUSR2)}
                if threading.current_thread() is threading.main_thread() else {})
    argv = list(sys.argv[1:] if argv is None else argv)
    stage = spec = None
    try:
        stage = _stage_of(argv)
        parser, source = stage_parser(stage)
        args = parser.parse_args(kebab_flags(argv[1:]))
        logging.basicConfig(level=args.log_level.upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        spec = load_spec(stage.spec, args.config, source(parsed_args=args)(), check_inputs=True)
        with system_metrics():
            manifest = stage.run(spec)
    except LmforgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (Preempted, _Stopped) as exc:
        print(f"stopped: {exc}; run the same command again to resume", file=sys.stderr)
        return Preempted.exit_code
    except KeyboardInterrupt:
        print("interrupted: no output was left under its final name", file=sys.stderr)
        return 130
    except Exception as exc:
        where = stage.output(spec) if spec is not None else None
        full = out_of_space(exc, where) if where is not None else None
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if manifest is not None:  # commands and ranks other than 0 of a distributed stage: None
        print(manifest.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
