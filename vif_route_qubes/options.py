"""Option decorators shared by the commands of both programs."""

import click

BACKENDS = click.Choice(["auto", "iptables", "nft"])


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
    click.option("--lock-timeout", type=click.FloatRange(0), default=60.0, show_default=True,
                 envvar="VIF_ROUTE_LOCK_TIMEOUT", show_envvar=True,
                 help="Seconds to wait for the lock before failing."),
)


def run_main(command: click.Command, args: list[str], prog_name: str) -> None:
    """Run a click command; a usage error is one line on stderr and exit 2."""
    try:
        status = command.main(args=args, prog_name=prog_name, standalone_mode=False)
    except click.UsageError as exc:
        click.echo(f"{prog_name}: {exc.format_message()} (see {prog_name} --help)", err=True)
        raise SystemExit(2) from None
    except click.ClickException as exc:
        click.echo(f"{prog_name}: {exc.format_message()}", err=True)
        raise SystemExit(exc.exit_code) from None
    except click.Abort:
        raise SystemExit(1) from None
    raise SystemExit(status if isinstance(status, int) else 0)
