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
            if role == "key":  # secrets are not stored, so each run rolls the demo key
                click.echo(f"demo API key for {email}: {password}")
            else:
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

    @app.cli.command("create-key")
    @click.argument("email")
    @click.option("--name", default="cli", show_default=True)
    @click.option("--group", "group_slug", default=None, help="Group slug (default: the account's default).")
    def create_key_cmd(email: str, name: str, group_slug: str | None) -> None:
        """Create an API key; the secret is printed alone on the last line (shown only once)."""
        from console import keys

        try:
            key, secret = keys.create_key_for_email(email, name, group_slug)
        except keys.KeyInputError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"created key {key.id} ({key.display_prefix}) for {email}")
        click.echo(secret)

    @app.cli.command("mint-vouchers")
    @click.option("--count", type=click.IntRange(1, 10_000), required=True)
    @click.option("--value", "value_raw", required=True, help="Face value in credits, e.g. 50 or 12.5")
    @click.option("--expires-days", type=click.IntRange(1, 3650), default=None)
    @click.option("--note", default="")
    @click.option("--out", "out_path", type=click.Path(dir_okay=False, writable=True), required=True)
    def mint_vouchers_cmd(count: int, value_raw: str, expires_days: int | None, note: str,
                          out_path: str) -> None:
        """Mint a batch; the codes go to the CSV file (mode 600) and nowhere else."""
        import os
        import tempfile

        from console import money, vouchers

        if os.path.exists(out_path):
            raise click.ClickException(f"{out_path} exists; codes are never overwritten")
        try:
            value = money.parse_credits(value_raw)
            expires_at = vouchers.expiry_from_days(expires_days)
            note = vouchers.check_note(note)
        except (money.MoneyError, vouchers.VoucherError) as exc:
            raise click.ClickException(str(exc)) from exc
        # mkstemp creates the file with mode 600. It is renamed into place only once written
        # and synced; if that fails, the batch is disabled so no unrecorded code can be used.
        fd, tmp = tempfile.mkstemp(prefix=".mint-", suffix=".csv",
                                   dir=os.path.dirname(os.path.abspath(out_path)))
        batch = None
        try:
            with os.fdopen(fd, "w", encoding="ascii", newline="") as fh:
                batch, codes = vouchers.mint_batch(count, value, expires_at=expires_at, note=note)
                fh.write(vouchers.codes_csv(codes, value, expires_at))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, out_path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            if batch is not None:
                vouchers.set_batch_status(batch.id, "disabled", actor_id=None)
            raise
        click.echo(f"minted batch {batch.id}: {count} codes of {value_raw} credits -> {out_path}")

    @app.cli.command("channel-add")
    @click.option("--name", required=True)
    @click.option("--type", "type_", type=click.Choice(["openai", "anthropic"]), required=True)
    @click.option("--base-url", required=True, help="e.g. https://api.openai.com/v1 or https://api.anthropic.com")
    @click.option("--api-key", required=True, envvar="CHANNEL_API_KEY", help="or set CHANNEL_API_KEY")
    @click.option("--models", required=True, help="m1,m2 or public=upstream pairs")
    @click.option("--groups", default="", help="group slugs; empty serves every group")
    @click.option("--priority", type=int, default=0)
    @click.option("--weight", type=int, default=1)
    def channel_add_cmd(name, type_, base_url, api_key, models, groups, priority, weight) -> None:
        """Add an upstream channel (the key is stored encrypted and never printed)."""
        from console.channels import ChannelError, create_channel

        try:
            ch = create_channel(name=name, type=type_, base_url=base_url, api_key=api_key,
                                models=models, groups=groups, priority=priority, weight=weight)
        except ChannelError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"channel {ch.id} {ch.name} ({ch.type}) added")

    @app.cli.command("reconcile")
    def reconcile_cmd() -> None:
        """Settle relay calls left pending past their deadline (idempotent)."""
        from console.relay.metering import reconcile

        total = 0
        while True:
            n = reconcile()
            total += n
            if n == 0:
                break
        click.echo(f"reconciled {total} pending usage records")

    @app.cli.command("channel-probe")
    def channel_probe_cmd() -> None:
        """Probe the paused channels whose pause is over (the server does this every 15 s)."""
        from console.relay.probe import probe_due

        click.echo(f"probed {probe_due()} paused channels")

    @app.cli.command("ledger-verify")
    def ledger_verify_cmd() -> None:
        """Exit non-zero and list every wallet whose balance differs from its ledger sum."""
        from console.ledger import verify, wallet_count

        bad = verify()
        for m in bad:
            click.echo(f"user {m.user_id}: balance {m.balance_micros} != ledger sum "
                       f"{m.ledger_sum_micros} (last balance_after {m.last_balance_after})")
        if bad:
            sys.exit(1)
        click.echo(f"ledger ok: {wallet_count()} wallets checked; every balance equals the sum "
                   "of its ledger entries and its last balance_after")

