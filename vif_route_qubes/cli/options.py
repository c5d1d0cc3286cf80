"""click's side of the option table (vif_route_qubes/optspec.py): the option decorators of
both programs' commands, the Seconds type, and how a command is run."""

import os
import sys

import click

from vif_route_qubes.optspec import Opt

MAX_SECONDS = 86400.0


class Seconds(click.ParamType):
    """A finite number of seconds, 0 (or `low`) to a day: nan and inf are refused."""

    name = "seconds"

    def __init__(self, low: float = 0.0) -> None:
        self.low = low

    def convert(self, value, param, ctx):
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not self.low <= number <= MAX_SECONDS:  # false for nan too
            self.fail(f"{value!r} is not between {self.low:g} and {MAX_SECONDS:g} seconds", param, ctx)
        return number


def click_option(opt: Opt):
    """The click.option (or click.argument) for one row of the table."""
    if opt.kind == "argument":
        return click.argument(opt.dest, required=False, envvar=opt.envvar)
    if opt.kind == "arguments":
        return click.argument(opt.dest, nargs=-1)
    kwargs = {"envvar": opt.envvar, "show_envvar": bool(opt.envvar), "help": opt.help,
              "show_default": opt.show_default}
    if opt.default is not None:
        kwargs["default"] = opt.default
    if opt.kind == "flag":
        return click.option(*opt.flags, opt.dest, is_flag=True, **kwargs)
    if opt.kind == "switch":  # no default: None means "ask qubesdb"
        return click.option("/".join(opt.flags), opt.dest, default=None, **kwargs)
    if opt.kind == "choice":
        kwargs["type"] = click.Choice(list(opt.choices))
    elif opt.kind == "seconds":
        kwargs["type"] = Seconds(opt.low)
    return click.option(*opt.flags, opt.dest, **kwargs)


def options_of(specs: tuple[Opt, ...]):
    """A decorator adding every option of the table, in its order."""

    def apply(func):
        for opt in reversed(specs):
            func = click_option(opt)(func)
        return func

    return apply


def one_line(text: str) -> str:
    """A message as one printable line: control characters (from untrusted
    arguments) are escaped, never written raw."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def run_main(command: click.Command, args: list[str], prog_name: str) -> None:
    """Run a click command and end with SystemExit(status); a usage error is one
    line on stderr and exit 2."""
    raise SystemExit(_flushed(_run(command, args, prog_name)))


def _run(command: click.Command, args: list[str], prog_name: str) -> int:
    if not args and isinstance(command, click.Group):
        click.echo(f"{prog_name}: missing command (see {prog_name} --help)", err=True)
        return 2
    try:
        status = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.UsageError as exc:
        click.echo(f"{prog_name}: {one_line(exc.format_message())} (see {prog_name} --help)", err=True)
        return 2
    except click.ClickException as exc:
        click.echo(f"{prog_name}: {one_line(exc.format_message())}", err=True)
        return exc.exit_code
    except click.Abort:
        return 1
    except SystemExit as exc:  # a command's own status (sys.exit in the command)
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        click.echo(exc.code, err=True)
        return 1
    return status if isinstance(status, int) else 0


def _flushed(status: int) -> int:
    """stdout flushed before the end: when its reader is gone (`--dry-run | head -1`)
    the status is 120, as the interpreter's, without its second failure at exit."""
    if sys.stdout is None:  # started with descriptor 1 closed
        return status
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return status or 120
    return status
