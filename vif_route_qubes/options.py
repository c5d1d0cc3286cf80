"""Option decorators shared by the commands of both programs."""

import click

BACKENDS = click.Choice(["auto", "iptables", "nft"])
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
        if not self.low <= number <= MAX_SECONDS:  # also false for nan
            self.fail(f"{value!r} is not between {self.low:g} and {MAX_SECONDS:g} seconds", param, ctx)
        return number


def _stack(*decorators):
    def apply(func):
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


common_options = _stack(
    click.option("--dry-run", is_flag=True, envvar="VIF_ROUTE_DRY_RUN", show_envvar=True,
                 help="Change nothing; print the shell script of what would be done."),
    click.option("-v", "--verbose", is_flag=True, envvar="VIF_ROUTE_VERBOSE", show_envvar=True,
                 help="Log every step to stderr as well."),
    click.option("--backend", type=BACKENDS, default="auto", show_default=True, envvar="QUBES_NET_BACKEND",
                 show_envvar=True, help="Firewall backend; auto picks nft when the table `ip qubes` exists, else iptables."),
    click.option("--lock-file", default="/run/vif-route-qubes.lock", show_default=True,
                 envvar="VIF_ROUTE_LOCK_FILE", show_envvar=True,
                 help="Lock held around each read-plan-apply cycle."),
    click.option("--lock-timeout", type=Seconds(), default=60.0, show_default=True,
                 envvar="VIF_ROUTE_LOCK_TIMEOUT", show_envvar=True,
                 help="Seconds to wait for the lock before failing."),
    click.option("--tool-timeout", type=Seconds(0.1), default=10.0, show_default=True,
                 envvar="VIF_ROUTE_TOOL_TIMEOUT", show_envvar=True,
                 help="Seconds before a hung xenstore or qubesdb tool counts as failed."),
)


def one_line(text: str) -> str:
    """A message as one printable line: control characters (from untrusted
    arguments) are escaped, never written raw."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def run_main(command: click.Command, args: list[str], prog_name: str) -> None:
    """Run a click command; a usage error is one line on stderr and exit 2."""
    if not args and isinstance(command, click.Group):
        click.echo(f"{prog_name}: missing command (see {prog_name} --help)", err=True)
        raise SystemExit(2)
    try:
        status = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.UsageError as exc:
        click.echo(f"{prog_name}: {one_line(exc.format_message())} (see {prog_name} --help)", err=True)
        raise SystemExit(2) from None
    except click.ClickException as exc:
        click.echo(f"{prog_name}: {one_line(exc.format_message())}", err=True)
        raise SystemExit(exc.exit_code) from None
    except click.Abort:
        raise SystemExit(1) from None
    raise SystemExit(status if isinstance(status, int) else 0)
