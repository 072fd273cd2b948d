"""The `policyd` command. Each subcommand opens the core and calls one method; no logic here.

Errors from the core become one line on stderr and a non-zero exit:
  0 success (for `check`: allow), 1 error, 2 bad usage, 3 `check` answered deny,
  4 the policy does not validate (`policy check/test/explain`), 5 policy tests failed.
Listing commands print an aligned table, or with --json one JSON object per line.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable

import click

from policyd import __version__
from policyd.cli import (
    access,
    apps,
    audit,
    check,
    cluster,
    connectors,
    demo,
    grants,
    policy,
    serve,
    tokens,
)
from policyd.cli.context import Context
from policyd.core.errors import PolicydError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    metavar="FILE",
    help="TOML config file (default: $POLICYD_CONFIG, else ./policyd.toml if present).",
)
@click.version_option(__version__, prog_name="policyd")
@click.pass_context
def cli(ctx: click.Context, config_path: str | None) -> None:
    """policyd: authorization decisions for the data hub."""
    ctx.obj = Context(config_path)
    ctx.call_on_close(ctx.obj.close)


for command in (
    serve.serve,
    apps.apps,
    connectors.connectors,
    access.users,
    access.datasources,
    grants.consents,
    grants.grants,
    tokens.keys,
    tokens.tokens,
    check.check,
    demo.demo,
    audit.audit,
    policy.policy,
    cluster.cluster,
):
    cli.add_command(command)


def main(argv: Iterable[str] | None = None) -> int:
    """Run the CLI; returns the exit code. Never lets a traceback reach the user."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        cli.main(args=args, prog_name="policyd", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("policyd: aborted", err=True)
        return 1
    except click.ClickException as exc:
        message = exc.format_message().splitlines()[0] if exc.format_message() else ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            command = exc.ctx.command_path
            click.echo(f"{command}: error: {message} (see '{command} --help')", err=True)
        else:
            click.echo(f"policyd: error: {message}", err=True)
        return int(exc.exit_code)
    except PolicydError as exc:
        click.echo(f"policyd: error: {exc}", err=True)
        return 1
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except OSError as exc:
        click.echo(
            f"policyd: error: {exc.strerror or exc}"
            + (f": {exc.filename}" if exc.filename else ""),
            err=True,
        )
        return 1
    except Exception as exc:  # a bug: still one line, never a traceback
        click.echo(f"policyd: internal error: {type(exc).__name__}: {exc}", err=True)
        return 1
    return 0
