"""`python -m engine <stage> [--config spec.yaml] [--field value ...]`: run one stage on this node.

Flags are generated from the stage's spec model (field `output_prefix` is `--output-prefix`), so
the CLI, spec files and Prefect parameters can never disagree. Flags override the spec file.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import typing
from typing import Any

from pydantic.fields import FieldInfo

from engine.atomic import out_of_space
from engine.errors import LmforgeError, Preempted
from engine.metrics import system_metrics
from engine.registry import STAGES, get_stage
from engine.spec import load_spec


def _is_list(annotation: Any) -> bool:
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        return True
    return any(_is_list(a) for a in typing.get_args(annotation) if a is not type(None))


def _is_bool(annotation: Any) -> bool:
    return annotation is bool


def _add_field(parser: argparse.ArgumentParser, name: str, field: FieldInfo) -> None:
    flags = ["--" + name.replace("_", "-")]
    alias = field.validation_alias
    for extra in getattr(alias, "choices", []) if alias is not None else []:
        flag = "--" + str(extra).replace("_", "-")
        if flag not in flags:
            flags.append(flag)
    helptext = (field.description or "").replace("%", "%%")
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": helptext}
    if _is_bool(field.annotation):
        kwargs["action"] = argparse.BooleanOptionalAction
    elif _is_list(field.annotation):
        kwargs["nargs"] = "+"
    parser.add_argument(*flags, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="stage", required=True, metavar="STAGE")
    for name in STAGES:
        stage = get_stage(name)
        p = sub.add_parser(name, help=stage.doc, description=stage.doc)
        p.add_argument("--config", help="spec file (YAML or JSON); flags override its fields")
        for field_name, field in stage.spec.model_fields.items():
            _add_field(p, field_name, field)
    return parser


class _Stopped(BaseException):
    """A stop signal reached a stage that does not hold signals itself: unwind, so that its
    temporary output is removed on the way out."""


def _stop(signum, frame) -> None:
    raise _Stopped(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    # held from the first line: a stop during start-up (imports take seconds) is a clean stop too
    previous = ({sig: signal.signal(sig, _stop) for sig in (signal.SIGTERM, signal.SIGUSR2)}
                if threading.current_thread() is threading.main_thread() else {})
    stage = spec = None
    try:
        args = vars(build_parser().parse_args(argv))
        logging.basicConfig(level=args.pop("log_level").upper(),
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        stage = get_stage(args.pop("stage"))
        spec = load_spec(stage.spec, args.pop("config", None), args)
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
        full = out_of_space(exc, stage.output(spec)) if spec is not None else None
        if full is None:
            raise
        print(f"error: {full}", file=sys.stderr)
        return 2
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if manifest is not None:  # ranks other than 0 of a distributed stage return None
        print(manifest.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
