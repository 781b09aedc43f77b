"""``python -m serving.webapp create-user NAME [--admin]``: make a web app account.

The password is read from the terminal (twice), or from stdin with ``--password-stdin``.
``list`` prints the accounts. Uses ``webapp.database_url`` of the resolved config.
"""

from __future__ import annotations

import argparse
import getpass
import sys

from serving.webapp.accounts import AccountError, Accounts
from training.config import load_config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m serving.webapp", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    create = sub.add_parser("create-user", help="create an account")
    create.add_argument("username")
    create.add_argument("--admin", action="store_true", help="give it the admin role")
    create.add_argument("--password-stdin", action="store_true")
    sub.add_parser("list", help="list accounts")
    args = parser.parse_args(argv)
    cfg = load_config()
    w = cfg.webapp
    accounts = Accounts(cfg.webapp_database_url, max_failed=w.max_failed_logins,
                        lockout_s=w.lockout_s, min_password_length=w.min_password_length)
    if args.cmd == "list":
        for user in accounts.list():
            print(f"{user.username}\t{user.role}\t{user.created_at:%Y-%m-%d %H:%M}")
        return 0
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("error: the passwords differ", file=sys.stderr)
            return 2
    try:
        user = accounts.create(args.username, password, "admin" if args.admin else "user")
    except AccountError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"created {user.username} ({user.role})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
