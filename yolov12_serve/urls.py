"""Camera URLs: secrets masked wherever text leaves the process, and credentials taken from outside the camera list.

Masking (`redact_url`, `redact_text`): a URL's password (`rtsp://user:***@host/...`) and the values of query or
fragment parameters that carry credentials (`?token=***`, `password=`, `key=`, `sig=`, `X-Amz-Signature=`, ...)
are replaced by `***`; everything else is kept byte for byte (an IPv6 host `[fe80::1%eth0]:554` stays as it was,
nothing is re-encoded), so a masked URL still says which camera it is. A malformed URL is masked by the same
rules without being parsed by `urllib` (which would raise). `redact_text` masks every URL inside free text: FFmpeg's
errors quote the URL they failed on, password included (`Connection refused: 'rtsp://user:pw@...'`).

Credentials from outside (`expand_credentials`): the operator's camera list (a --streams file, --source) may write
`rtsp://${CAM_USER}:${CAM_PASS}@10.0.0.5/stream1` (environment variables; values in the user-info part are
percent-encoded, so a password may hold ':' or '@'), or give a stream `credentials: FILE`, a file holding
`USER:PASSWORD` (a Kubernetes / Docker secret mounted as a file), so that cameras.yaml itself holds none. A
variable that is not set is a one-line ConfigError naming it. URLs sent over gRPC (AddStream) are never expanded:
a client must not be able to make the server read its environment or files into a URL it chooses.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote, unquote

from .errors import ConfigError

__all__ = ["MASK", "authority_end", "expand_credentials", "read_credentials", "redact_text", "redact_url",
           "secret_param", "stray_userinfo"]

MASK = "***"

# a URL: scheme://, then anything but whitespace and the quotes / brackets that surround URLs in messages
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
_SPLIT = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*:)?(?P<slashes>//)?(?P<rest>.*)$", re.S)
# parameter names that carry credentials: token, access_token, password, passwd, pwd, secret, key, apikey,
# api_key, sig, signature, auth, authorization, credential(s), session, X-Amz-Security-Token, ...
_SECRET_NAME = re.compile(r"token|pass|pwd|secret|key|sig|auth|cred|session|cookie|ticket", re.I)
_VAR = re.compile(r"\$\{([^}]*)\}")
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def secret_param(name: str) -> bool:
    """True when a query parameter of this name carries a credential (its value is masked)."""
    return bool(_SECRET_NAME.search(unquote(name)))


_PARAM = re.compile(r"(?P<name>[^&;=/?#]+)=(?P<value>[^&;/?#]*)")  # name=value between & ; / ? #


def _mask_params(text: str) -> str:
    """`name=value` pairs (separated by & or ;, as some cameras write `;password=`) with secret values masked."""
    return _PARAM.sub(lambda m: f"{m['name']}={MASK}" if m["value"] and secret_param(m["name"]) else m[0], text)


def authority_end(rest: str) -> int:
    """Where the authority of `rest` (a URL after its '//') ends: at the first / ? or #."""
    return min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))


def stray_userinfo(rest: str) -> bool:
    """True when `rest` (a URL after its '//') looks like a password holding a raw / ? or # ('admin:ab#c@host/'):
    an authority with a ':' and no '@', and an '@' after it. Every URL parser, FFmpeg's too, ends the host at that
    character, so the host read is 'admin', the password sits in the path, and no host:port tells it apart."""
    cut = authority_end(rest)
    return ":" in rest[:cut] and "@" not in rest[:cut] and "@" in rest[cut:]


def redact_url(url: str) -> str:
    """`url` with its password and credential-carrying parameters replaced by '***' (safe to log and show).

    Only the secret parts change: host, port, path and the other parameters are kept as written (IPv6 hosts
    included). Strings that are not URLs come back unchanged."""
    m = _SPLIT.match(url)
    if m is None:  # pragma: no cover - the pattern matches every string
        return url
    scheme, slashes, rest = m.group("scheme") or "", m.group("slashes") or "", m.group("rest")
    if not slashes:  # no authority part: 'file.mp4', 'mailto:x', ... (a query may still carry a token)
        authority, tail = "", rest
    elif stray_userinfo(rest):  # everything up to the last '@' may be secret
        user, _, after = rest.partition(":")
        return f"{scheme}{slashes}{user}:{MASK}@{_mask_params(after.rpartition('@')[2])}"
    else:
        cut = authority_end(rest)
        authority, tail = rest[:cut], rest[cut:]
    if "@" in authority:
        userinfo, _, hostport = authority.rpartition("@")
        user, colon, password = userinfo.partition(":")
        if colon and password:
            authority = f"{user}:{MASK}@{hostport}"
    # query, fragment (OAuth-style '#access_token=...') and ';name=value' path parameters
    return f"{scheme}{slashes}{authority}{_mask_params(tail)}"


def redact_text(text: str) -> str:
    """`text` with every URL in it masked by `redact_url` (error messages, log lines)."""
    if "://" not in text:
        return text
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0)), text)


def read_credentials(credentials: str | Path, where: str, base: Path | None = None) -> tuple[str, str]:
    """(user, password) from a file holding one line `USER:PASSWORD` (relative to `base`); ConfigError saying what
    is wrong with it, never what it holds (`where` says whose file it is)."""
    path = Path(credentials)
    if base is not None and not path.is_absolute():
        path = base / path
    try:
        line = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else "not text" if isinstance(e, ValueError) else e
        raise ConfigError(f"{where}: cannot read its credentials file {path}: {why}") from None
    user, colon, password = line.partition(":")
    if not colon or not user or "\n" in line:
        raise ConfigError(f"{where}: credentials file {path} must hold one line USER:PASSWORD")
    return user, password


def expand_credentials(url: str, where: str, credentials: str | Path | None = None,
                       env: Mapping[str, str] | None = None, base: Path | None = None) -> str:
    """The operator's `url` with `${VAR}` taken from the environment and, with `credentials` (a file holding
    `USER:PASSWORD`, relative to `base`), that user and password put in its user-info part; ConfigError naming
    what is missing (`where` says which stream). User-info values are percent-encoded; other values go in as
    they are (a whole URL may come from one variable)."""
    env = os.environ if env is None else env
    scheme_end = url.find("://")
    auth_start = scheme_end + 3 if scheme_end >= 0 else -1
    auth_end = len(url)
    if auth_start >= 0:
        for ch in "/?#":  # a placeholder holds none of these: the template's authority ends at the first
            i = url.find(ch, auth_start)
            if i >= 0:
                auth_end = min(auth_end, i)
    userinfo_end = url.rfind("@", auth_start, auth_end) if auth_start >= 0 else -1

    def value(m: re.Match[str]) -> str:
        name = m.group(1)
        if not _VAR_NAME.match(name):
            raise ConfigError(f"{where}: '${{{name}}}' in its url is not a variable name (letters, digits, _)")
        if name not in env:
            raise ConfigError(f"{where}: environment variable {name} is not set (its url uses ${{{name}}})")
        in_userinfo = auth_start <= m.start() < userinfo_end
        return quote(env[name], safe="") if in_userinfo else env[name]

    expanded = _VAR.sub(value, url)
    if credentials is None:
        return expanded
    user, password = read_credentials(credentials, where, base)
    head, sep, rest = expanded.partition("://")
    if not sep:
        raise ConfigError(f"{where}: credentials need a URL with a host (rtsp://HOST/...)")
    hostpart = rest
    if "@" in rest[:authority_end(rest)]:
        raise ConfigError(f"{where}: its url already holds a user name: give credentials in one place only")
    return f"{head}://{quote(user, safe='')}:{quote(password, safe='')}@{hostpart}"
