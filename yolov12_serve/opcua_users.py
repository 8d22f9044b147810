"""OPC UA user names and passwords (`--opcua-users FILE`, only with `--opcua-cert`): the users file and the command
that makes its lines.

The file holds one `NAME:HASH` per line; blank lines and `#` comments are ignored. HASH is a salted scrypt hash
(`scrypt$N$R$P$SALT$KEY`, base64), made by

    (umask 077; python -m yolov12_serve.opcua_users NAME >> opcua-users)     # asks the password twice

so the file holds no password, and is read again on SIGHUP (opcua.py). A password is checked in constant time
against every hash; a name the file does not hold costs the same as a wrong password (a dummy hash is checked),
so that a client cannot learn which names exist from the time a refusal takes.
"""

from __future__ import annotations

import base64
import collections
import getpass
import hashlib
import hmac
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .argparsing import OneLineParser
from .auth import warn_if_readable_by_others
from .errors import ConfigError

__all__ = ["MIN_PASSWORD_LEN", "LoginLimiter", "UserTable", "hash_password", "main"]

log = logging.getLogger(__name__)

FLAG = "--opcua-users"
PROG = "python -m yolov12_serve.opcua_users"
MIN_PASSWORD_LEN = 8
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1  # ~16 MiB and ~50 ms a check on a 2-core VM
_NAME = re.compile(r"[^\s:#]{1,64}")  # printable, no spaces, ':' (the separator) or '#' (comments)
_HASH = re.compile(r"scrypt\$(\d+)\$(\d+)\$(\d+)\$([A-Za-z0-9+/=]+)\$([A-Za-z0-9+/=]+)")


# scrypt needs 128*N*R bytes and a little more (128*R*P, OpenSSL's own): the most a line may ask (128*N*R of 256 MiB,
# _parse_hash) must fit, or every login of that user is a ValueError inside asyncua rather than a check
_MAXMEM = 2**28 + 2**24


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int, length: int) -> bytes:
    return hashlib.scrypt(password.encode("utf-8", "surrogateescape"), salt=salt, n=n, r=r, p=p,
                          maxmem=_MAXMEM, dklen=length)


def hash_password(password: str) -> str:
    """A salted scrypt hash of `password` in the users file's form (`scrypt$N$R$P$SALT$KEY`)."""
    salt = os.urandom(16)
    key = _scrypt(password, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P, 32)
    b64 = lambda b: base64.b64encode(b).decode("ascii")  # noqa: E731
    return f"scrypt${SCRYPT_N}${SCRYPT_R}${SCRYPT_P}${b64(salt)}${b64(key)}"


@dataclass(frozen=True)
class _Hash:
    n: int
    r: int
    p: int
    salt: bytes
    key: bytes

    def matches(self, password: str) -> bool:
        return hmac.compare_digest(_scrypt(password, self.salt, self.n, self.r, self.p, len(self.key)), self.key)


def _parse_hash(text: str, path: Path, line: int) -> _Hash:
    where = f"{FLAG} {path}, line {line}"
    found = _HASH.fullmatch(text)
    if found is None:
        raise ConfigError(f"{where}: expected NAME:scrypt$N$R$P$SALT$KEY (make the line with `python -m "
                          "yolov12_serve.opcua_users NAME`)")
    n, r, p = (int(found[i]) for i in (1, 2, 3))
    # bounded: a line must not make every login take seconds or gigabytes
    if n < 2**10 or n > 2**20 or n & (n - 1) or not 1 <= r <= 32 or not 1 <= p <= 16 or 128 * n * r > 2**28:
        raise ConfigError(f"{where}: scrypt parameters N={n} R={r} P={p} out of range (N a power of 2 from 1024 to "
                          "1048576, R 1..32, P 1..16, 128*N*R at most 256 MiB)")
    try:
        salt, key = base64.b64decode(found[4], validate=True), base64.b64decode(found[5], validate=True)
    except ValueError:
        raise ConfigError(f"{where}: the salt or key is not base64") from None
    if len(salt) < 8 or not 16 <= len(key) <= 64:
        raise ConfigError(f"{where}: the salt (at least 8 bytes) or key (16 to 64 bytes) is too short or long")
    return _Hash(n, r, p, salt, key)


_DUMMY = _Hash(SCRYPT_N, SCRYPT_R, SCRYPT_P, b"\0" * 16, b"\0" * 32)  # checked for a name not in the file


@dataclass(frozen=True)
class UserTable:
    """The users of one users file, by name."""

    users: dict[str, _Hash]
    path: str = ""
    dummy: _Hash = _DUMMY  # checked for a name not in the file: at the file's own scrypt cost (see load)

    @classmethod
    def load(cls, path: str | Path) -> UserTable:
        """Read a users file; ConfigError naming the file and line (never a hash) for anything wrong."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows' Notepad) is no part of the first name
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {FLAG} {path}: {getattr(e, 'strerror', None) or e}") from None
        users: dict[str, _Hash] = {}
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            name, sep, hashed = line.partition(":")
            if not sep or not _NAME.fullmatch(name):
                raise ConfigError(f"{FLAG} {path}, line {n}: expected NAME:HASH, a name of 1 to 64 characters "
                                  "without spaces, ':' or '#'")
            if name in users:
                raise ConfigError(f"{FLAG} {path}, line {n}: user {name} is already listed above")
            users[name] = _parse_hash(hashed.strip(), path, n)
        if not users:
            raise ConfigError(f"{FLAG} {path} holds no user: add lines made by `python -m yolov12_serve.opcua_users "
                              "NAME`")
        warn_if_readable_by_others(path, FLAG)
        return cls(users, str(path), _dummy_like(users, path))

    def check(self, name: str | None, password: str | None) -> bool:
        """Whether `name` may log in with `password`; as slow for an unknown name as for a wrong password."""
        known = self.users.get(name or "")
        ok = (known or self.dummy).matches(password or "")
        return ok and known is not None

    def __len__(self) -> int:
        return len(self.users)


class LoginLimiter:
    """At most `burst` password checks at once and `per_s` a second after that, for all clients together: a check
    costs ~50 ms on the OPC UA loop (asyncua calls it there), so a client trying passwords in a loop would stall the
    PLCs' tag updates and guess freely. Over the limit a login is refused unchecked; the refusals are logged in one
    line a minute at most, not one each."""

    def __init__(self, burst: int = 20, per_s: float = 4.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.burst, self.per_s, self._clock = burst, per_s, clock
        self._tokens, self._at = float(burst), clock()
        self._lock = threading.Lock()
        self._refused = 0  # refused unchecked since the last line
        self._said_at = -math.inf
        self.refused_total = 0

    def allow(self) -> bool:
        """Whether a password may be checked now (one token taken), else False (counted, said once a minute)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.per_s)
            self._at = now
            if self._tokens >= 1:
                self._tokens -= 1
                return True
            self._refused += 1
            self.refused_total += 1
            if now - self._said_at >= 60:
                log.warning("opcua: %d logins refused unchecked: more than %d in a row or %g a second (a client "
                            "trying passwords? its address is in the lines of asyncua's session log)", self._refused,
                            self.burst, self.per_s)
                self._said_at, self._refused = now, 0
            return False


def _dummy_like(users: dict[str, _Hash], path: Path) -> _Hash:
    """The hash an unknown name is checked against, at the scrypt cost most lines have: a refusal of an unknown name
    then takes as long as a wrong password of those lines. Lines of other costs are told apart by time: warned."""
    costs = collections.Counter((h.n, h.r, h.p) for h in users.values())
    (n, r, p), _ = costs.most_common(1)[0]
    if len(costs) > 1:
        log.warning("%s %s: its lines have %d different scrypt costs, so the time a refused login takes can tell which "
                    "names exist: make every line again with `%s NAME`", FLAG, path, len(costs), PROG)
    return _Hash(n, r, p, b"\0" * 16, b"\0" * 32)



def main(argv: Sequence[str] | None = None, ask: Callable[[str], str] | None = None) -> int:
    """`python -m yolov12_serve.opcua_users NAME`: ask the password twice (`ask`, else getpass on a terminal; a
    script's pipe: one line of stdin, once) and print the users file's line for NAME; a bad name or password is one
    line and exit 2."""
    parser = OneLineParser(prog=PROG, description=f"Print a line of the {FLAG} file: NAME and a salted scrypt hash "
                           "of the password asked for (twice; without a terminal, one line read from stdin).")
    parser.add_argument("name", help="the OPC UA user name: 1 to 64 characters without spaces, ':' or '#'")
    args = parser.parse_args(argv)
    try:
        if not _NAME.fullmatch(args.name):
            raise ConfigError(f"user name {args.name!r}: 1 to 64 characters without spaces, ':' or '#'")
        if ask is None and not sys.stdin.isatty():
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            ask = ask or getpass.getpass
            password = ask(f"password for {args.name}: ")
            if ask(f"password for {args.name} again: ") != password:
                raise ConfigError("the two passwords differ: nothing printed")
        if len(password) < MIN_PASSWORD_LEN:
            raise ConfigError(f"the password has {len(password)} characters: use at least {MIN_PASSWORD_LEN}")
    except ConfigError as e:
        sys.stderr.write(f"{PROG}: {e}\n")
        return 2
    except (KeyboardInterrupt, EOFError):
        sys.stderr.write(f"{PROG}: no password given: nothing printed\n")
        return 130
    print(f"{args.name}:{hash_password(password)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
