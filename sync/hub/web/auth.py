"""Radiologists' local accounts on the hub: scrypt password hashes, server-side sessions with CSRF tokens,
lock-out after repeated failures, and the audit trail of who did what when."""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

from sync.core.errors import ConfigError, NotFoundError

# scrypt at N=2^15, r=8: ~0.1-0.2 s and 32 MiB per attempt on a hub core, so a stolen index is slow to attack.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 15, 8, 1
_MAXMEM = 64 * 1024 * 1024
USERNAME_RE = re.compile(r"[A-Za-z0-9._-]{2,64}")
ROLES = ("radiologist", "admin")
MIN_PASSWORD = 10


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P, maxmem=_MAXMEM)
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${salt.hex()}${digest.hex()}"


def check_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        got = hashlib.scrypt(password.encode("utf-8"), salt=bytes.fromhex(salt), n=int(n), r=int(r), p=int(p),
                             maxmem=_MAXMEM)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got.hex(), digest)


# A fixed hash to check against when the user does not exist: the answer takes as long either way.
_DUMMY = hash_password(secrets.token_hex(8))


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class Accounts:
    """Users, sessions and the audit log in the hub's index (SQLite or PostgreSQL)."""

    def __init__(self, store, *, session_hours: float = 10.0, idle_minutes: float = 60.0,
                 max_failures: int = 5, lockout_minutes: float = 15.0):
        self.store = store
        self.session_s, self.idle_s = session_hours * 3600, idle_minutes * 60
        self.max_failures, self.lockout_s = max_failures, lockout_minutes * 60

    # --- accounts ---------------------------------------------------------------------------------------------
    def add_user(self, username: str, password: str, *, full_name: str = "", role: str = "radiologist",
                 lang: str = "fr") -> None:
        if not USERNAME_RE.fullmatch(username):
            raise ConfigError("user names are 2-64 letters, digits, '.', '_' or '-'")
        if role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}")
        self._check_strength(password)
        with self.store.tx() as db:
            if db.execute("SELECT 1 FROM web_users WHERE username = ?", [username]).fetchone():
                raise ConfigError(f"user {username} exists already (use: wasla-hub user passwd)")
            db.execute("INSERT INTO web_users (username, full_name, role, lang, pw_hash, failed, locked_until, "
                       "created_at) VALUES (?, ?, ?, ?, ?, 0, NULL, ?)",
                       [username, full_name[:120], role, lang, hash_password(password), time.time()])
        self.audit(username, "user_created", detail=role)

    def set_password(self, username: str, password: str) -> None:
        self._check_strength(password)
        with self.store.tx() as db:
            cur = db.execute("UPDATE web_users SET pw_hash = ?, failed = 0, locked_until = NULL WHERE username = ?",
                             [hash_password(password), username])
            if cur.rowcount == 0:
                raise NotFoundError(f"no user {username}")
            db.execute("DELETE FROM web_sessions WHERE username = ?", [username])  # other sessions end
        self.audit(username, "password_set")

    def unlock(self, username: str) -> None:
        with self.store.tx() as db:
            if db.execute("UPDATE web_users SET failed = 0, locked_until = NULL WHERE username = ?",
                          [username]).rowcount == 0:
                raise NotFoundError(f"no user {username}")
        self.audit(username, "unlocked")

    def users(self) -> list[dict]:
        return self.store.query("SELECT username, full_name, role, lang, failed, locked_until, created_at, "
                                "last_login FROM web_users ORDER BY username")

    def user(self, username: str) -> dict | None:
        rows = self.store.query("SELECT username, full_name, role, lang FROM web_users WHERE username = ?", [username])
        return rows[0] if rows else None

    @staticmethod
    def _check_strength(password: str) -> None:
        if len(password) < MIN_PASSWORD:
            raise ConfigError(f"passwords need at least {MIN_PASSWORD} characters")

    # --- login ------------------------------------------------------------------------------------------------
    def login(self, username: str, password: str, remote: str = "") -> tuple[str | None, str]:
        """(session token, "ok") or (None, "bad" | "locked"). Every attempt is audited."""
        now = time.time()
        rows = self.store.query("SELECT pw_hash, failed, locked_until FROM web_users WHERE username = ?", [username])
        if not rows:
            check_password(password, _DUMMY)
            self.audit(username[:64], "login_failed", detail="unknown user", remote=remote)
            return None, "bad"
        user = rows[0]
        if user["locked_until"] and user["locked_until"] > now:
            self.audit(username, "login_refused", detail="locked", remote=remote)
            return None, "locked"
        if not check_password(password, user["pw_hash"]):
            failed = int(user["failed"] or 0) + 1
            locked = now + self.lockout_s if failed >= self.max_failures else None
            with self.store.tx() as db:
                db.execute("UPDATE web_users SET failed = ?, locked_until = ? WHERE username = ?",
                           [0 if locked else failed, locked, username])
            self.audit(username, "login_failed", detail="locked out" if locked else f"failure {failed}",
                       remote=remote)
            return None, "locked" if locked else "bad"
        token = secrets.token_urlsafe(32)
        with self.store.tx() as db:
            db.execute("UPDATE web_users SET failed = 0, locked_until = NULL, last_login = ? WHERE username = ?",
                       [now, username])
            db.execute("INSERT INTO web_sessions (token_hash, username, csrf, created_at, last_seen, remote) "
                       "VALUES (?, ?, ?, ?, ?, ?)", [_token_hash(token), username, secrets.token_urlsafe(32), now, now,
                                                     remote[:64]])
            db.execute("DELETE FROM web_sessions WHERE created_at < ?", [now - self.session_s])
        self.audit(username, "login", remote=remote)
        return token, "ok"

    def session(self, token: str | None) -> dict | None:
        """The live session of this cookie (and its user), or None; each use extends the idle timeout."""
        if not token or len(token) > 128:
            return None
        now = time.time()
        rows = self.store.query(
            "SELECT s.token_hash, s.username, s.csrf, s.created_at, s.last_seen, u.full_name, u.role, u.lang "
            "FROM web_sessions s JOIN web_users u ON u.username = s.username WHERE s.token_hash = ?",
            [_token_hash(token)])
        if not rows:
            return None
        s = rows[0]
        if s["created_at"] < now - self.session_s or s["last_seen"] < now - self.idle_s:
            self.logout(token)
            return None
        if now - s["last_seen"] > 30:  # one write a minute is enough for the idle clock
            with self.store.tx() as db:
                db.execute("UPDATE web_sessions SET last_seen = ? WHERE token_hash = ?", [now, s["token_hash"]])
        return s

    def logout(self, token: str) -> None:
        with self.store.tx() as db:
            db.execute("DELETE FROM web_sessions WHERE token_hash = ?", [_token_hash(token)])

    @staticmethod
    def csrf_ok(session: dict | None, sent: str | None) -> bool:
        return bool(session and sent and hmac.compare_digest(session["csrf"], sent))

    # --- audit ------------------------------------------------------------------------------------------------
    def audit(self, username: str | None, action: str, *, study_uid: str | None = None, detail: str = "",
              remote: str = "") -> None:
        with self.store.tx() as db:
            db.execute("INSERT INTO audit (at, username, action, study_uid, detail, remote) VALUES (?, ?, ?, ?, ?, ?)",
                       [time.time(), username, action, study_uid, detail[:300], remote[:64]])

    def audit_log(self, limit: int = 200, study_uid: str | None = None) -> list[dict]:
        where, params = ("WHERE study_uid = ?", [study_uid]) if study_uid else ("", [])
        return self.store.query(f"SELECT at, username, action, study_uid, detail, remote FROM audit {where} "
                                f"ORDER BY at DESC LIMIT ?", [*params, limit])
