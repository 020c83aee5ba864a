"""Flask CLI commands. Names are fixed: operators and scripts rely on them."""
from __future__ import annotations

import sys

import click
from flask import Flask



def register_cli(app: Flask) -> None:
    @app.cli.command("seed")
    @click.option("--demo", is_flag=True, help="Also create demo accounts, balance and key.")
    def seed_cmd(demo: bool) -> None:
        """Seed groups, official prices and the FAQ (idempotent)."""
        from console import seed

        if not demo:
            seed.seed_reference()
            click.echo("Seeded groups, prices and FAQ.")
            return
        for role, email, password in seed.seed_demo():
            click.echo(f"{role:6} login: {email}  password: {password}")

    @app.cli.command("create-user")
    @click.argument("email")
    @click.option("--password", required=True)
    @click.option("--role", type=click.Choice(["user", "support", "admin"]), default="user")
    def create_user_cmd(email: str, password: str, role: str) -> None:
        """Create an account with an empty wallet."""
        from console.accounts import AccountError, create_user

        try:
            user = create_user(email, password, role)
        except AccountError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"created {user.role} {user.email} (id {user.id})")

    @app.cli.command("ledger-verify")
    def ledger_verify_cmd() -> None:
        """Exit non-zero and list every wallet whose balance differs from its ledger sum."""
        from console.ledger import verify

        bad = verify()
        for m in bad:
            click.echo(f"user {m.user_id}: balance {m.balance_micros} != ledger sum {m.ledger_sum_micros}")
        if bad:
            sys.exit(1)
        click.echo("ledger ok: every balance equals the sum of its ledger entries")

