"""Web app accounts in a real database (SQLAlchemy): argon2 hashes, roles, lock-out.

One table, ``webapp_users``. The URL is ``cfg.webapp.database_url`` (the embedded default is
SQLite under ``$LEUKOFLOW_HOME``; the compose stack points it at its Postgres). Passwords are
hashed with argon2id (argon2-cffi's defaults, re-hashed on login when those change). After
``max_failed_logins`` wrong passwords in a row an account is locked for ``lockout_s`` seconds,
and a login attempt on a locked account is refused without checking the password.

``session_epoch`` is copied into the signed session cookie; logging out or changing the
password bumps it, so every cookie issued before stops working (a cookie session cannot be
revoked otherwise).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import DateTime, Integer, String, create_engine, func, make_url, select
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

__all__ = ["ROLES", "AccountError", "Accounts", "LoginResult", "User"]

ROLES = ("user", "admin")
USERNAME = re.compile(r"^[A-Za-z0-9_.@-]{3,64}$")
_HASHER = PasswordHasher()


class AccountError(ValueError):
    """A request about accounts that cannot be granted; the message is shown to the user."""


class _Base(DeclarativeBase):
    pass


class User(_Base):
    __tablename__ = "webapp_users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True, index=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16), default="user")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    session_epoch: Mapped[int] = mapped_column(Integer, default=0)


@dataclass(frozen=True)
class LoginResult:
    status: Literal["ok", "wrong", "locked"]
    user_id: int | None = None
    epoch: int = 0
    retry_after_s: int = 0


def _aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything here is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class Accounts:
    """The account store behind the web app (thread-safe: one short session per call)."""

    def __init__(self, url: str, *, max_failed: int = 5, lockout_s: int = 300,
                 min_password_length: int = 10) -> None:
        kwargs: dict = {}
        parsed = make_url(url)
        if parsed.get_backend_name() == "sqlite":
            kwargs["connect_args"] = {"check_same_thread": False}
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = create_engine(url, pool_pre_ping=True, **kwargs)
        _Base.metadata.create_all(self.engine)
        self.max_failed, self.lockout = max_failed, timedelta(seconds=lockout_s)
        self.min_password_length = min_password_length
        self._lock = threading.Lock()  # serialises failed-login counting within a process

    # ------------------------------------------------------------------ queries
    def count(self) -> int:
        with Session(self.engine) as s:
            return int(s.scalar(select(func.count()).select_from(User)) or 0)

    def get(self, user_id: int) -> User | None:
        with Session(self.engine) as s:
            return s.get(User, user_id)

    def list(self) -> list[User]:
        with Session(self.engine) as s:
            return list(s.scalars(select(User).order_by(User.username)))

    # ---------------------------------------------------------------- changes
    def check_password(self, password: str) -> None:
        if len(password) < self.min_password_length:
            raise AccountError(f"the password must have at least {self.min_password_length} "
                               "characters")

    def create(self, username: str, password: str, role: str = "user") -> User:
        username = username.strip()
        if not USERNAME.match(username):
            raise AccountError("a username has 3 to 64 letters, digits or . _ @ -")
        if role not in ROLES:
            raise AccountError(f"role must be one of {', '.join(ROLES)}")
        self.check_password(password)
        with Session(self.engine) as s:
            if s.scalar(select(User).where(User.username == username)) is not None:
                raise AccountError(f"the username {username!r} is taken")
            user = User(username=username, password_hash=_HASHER.hash(password), role=role,
                        created_at=datetime.now(UTC), failed_logins=0, session_epoch=0)
            s.add(user)
            s.commit()
            s.refresh(user)
            return user

    def login(self, username: str, password: str) -> LoginResult:
        """Check a password, counting failures; a locked account is refused unchecked."""
        now = datetime.now(UTC)
        with self._lock, Session(self.engine) as s:
            user = s.scalar(select(User).where(User.username == username.strip()))
            if user is None:
                _HASHER.hash(password)  # spend the same time as a real check
                return LoginResult("wrong")
            locked = _aware(user.locked_until)
            if locked is not None and locked > now:
                return LoginResult("locked", retry_after_s=int((locked - now).total_seconds()) + 1)
            try:
                _HASHER.verify(user.password_hash, password)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                user.failed_logins += 1
                if user.failed_logins >= self.max_failed:
                    user.locked_until, user.failed_logins = now + self.lockout, 0
                    s.commit()
                    return LoginResult("locked", retry_after_s=int(self.lockout.total_seconds()))
                s.commit()
                return LoginResult("wrong")
            if _HASHER.check_needs_rehash(user.password_hash):
                user.password_hash = _HASHER.hash(password)
            user.failed_logins, user.locked_until = 0, None
            s.commit()
            return LoginResult("ok", user.id, user.session_epoch)

    def bump_epoch(self, user_id: int) -> None:
        """Invalidate every session cookie issued to this user so far."""
        with Session(self.engine) as s:
            user = s.get(User, user_id)
            if user is not None:
                user.session_epoch += 1
                s.commit()

    def change_password(self, user_id: int, old: str, new: str) -> int:
        """Set a new password after checking the old one; returns the new session epoch."""
        self.check_password(new)
        with Session(self.engine) as s:
            user = s.get(User, user_id)
            if user is None:
                raise AccountError("no such user")
            try:
                _HASHER.verify(user.password_hash, old)
            except (VerifyMismatchError, VerificationError, InvalidHashError):
                raise AccountError("the current password is wrong") from None
            user.password_hash = _HASHER.hash(new)
            user.session_epoch += 1
            s.commit()
            return user.session_epoch
