"""
Who a session is: the daemon's secrets, the tokens derived from them, and
the ``session.auth`` method that checks them.

Two secrets live in the data directory, each created once, mode 0600:
``auth-token`` (the daemon secret; agent tokens are derived from it, so the
daemon keeps no token table) and ``host-token`` (the host role, which reads
every agent's runs). See docs/security.md for what each one protects.
"""

import base64
import hashlib
import hmac
import os
import stat
import time
from typing import Callable, Mapping, Optional

from twisted.logger import Logger

from car_twisted.errors import AuthFailed, AuthFailedTooOften, AuthRequired, InvalidParams
from car_twisted.disk import sync_directory
from car_twisted.records import id_param
from car_twisted.session import Session

log = Logger()

SECRET_FILE = "auth-token"
HOST_TOKEN_FILE = "host-token"
SECRET_ENV = "CAR_AUTH_TOKEN"

#: Methods an unauthenticated session may call.
OPEN_METHODS = frozenset({"session.auth", "server.handshake"})

_TOKEN_BYTES = 32
#: The shortest C{CAR_AUTH_TOKEN} accepted as the daemon secret (UTF-8 bytes).
MIN_SECRET_BYTES = 16

#: Token mismatches one connection may make; the last is answered and the
#: connection closed with 4001.
MAX_AUTH_FAILURES = 3
#: Seconds between two log lines about refused tokens; the refusals in
#: between are counted in the next line.
AUTH_FAILURE_LOG_INTERVAL = 10.0


def b64url_nopad(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def new_token() -> str:
    """43 characters of base64url: 32 random bytes."""
    return b64url_nopad(os.urandom(_TOKEN_BYTES))


def agent_token(secret: str, agent_id: str) -> str:
    """The token that binds a session to C{agent_id}."""
    digest = hmac.new(secret.encode(), b"agent:" + agent_id.encode(), hashlib.sha256)
    return b64url_nopad(digest.digest())


def tokens_match(given: str, expected: str) -> bool:
    """Constant-time comparison (hostile text need not be ASCII)."""
    return hmac.compare_digest(given.encode(), expected.encode())


class TokenFileError(Exception):
    """
    A secret (a token file, or C{CAR_AUTH_TOKEN}) cannot be used; the
    message says why and what to do.
    """


def read_token(path: str) -> str:
    """
    Read a token file, refusing one that others may read (its token must be
    presumed leaked).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        mode = os.fstat(fd).st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise TokenFileError(
                f"{path} is readable by other users (mode {stat.S_IMODE(mode):o}); "
                f"its token may have leaked: delete the file to have a new one made"
            )
        token = os.read(fd, 4096).decode("ascii", "replace").strip()
    finally:
        os.close(fd)
    if not token:
        raise TokenFileError(f"{path} is empty: delete it to have a new token made")
    return token


def ensure_token(path: str) -> str:
    """
    The token in C{path}, creating the file with a new token if it is missing.

    The file appears complete or not at all, and is never readable by anyone
    but its owner: the token is written to a private temporary file (created
    0600 with O_EXCL), which is then hard-linked into place; if another
    process got there first, its token is used.
    """
    try:
        return read_token(path)
    except FileNotFoundError:
        pass
    temporary = f"{path}.{os.getpid()}.{new_token()[:8]}.new"
    fd = os.open(temporary, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        try:
            os.write(fd, (new_token() + "\n").encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass
        else:
            sync_directory(os.path.dirname(path))
    finally:
        os.unlink(temporary)
    return read_token(path)


def ensure_data_dir(path: str) -> None:
    """Create the data directory, private (0700), if it does not exist."""
    os.makedirs(path, mode=0o700, exist_ok=True)


def daemon_secret(data_dir: str, environ: Mapping[str, str]) -> str:
    """
    The daemon secret without creating anything: C{CAR_AUTH_TOKEN} if set,
    else the data directory's secret file. Raises L{FileNotFoundError} when
    there is none yet.
    """
    return environment_secret(environ) or read_token(os.path.join(data_dir, SECRET_FILE))


def environment_secret(environ: Mapping[str, str]) -> Optional[str]:
    """
    C{CAR_AUTH_TOKEN}, if set and not empty. A short one is refused: every
    agent token derives from it, so it must be as hard to guess as they are.
    """
    secret = environ.get(SECRET_ENV)
    if secret and len(secret.encode()) < MIN_SECRET_BYTES:
        raise TokenFileError(
            f"${SECRET_ENV} is {len(secret.encode())} bytes, too short for the daemon secret "
            f"(at least {MIN_SECRET_BYTES}): set a long random value, or unset it to use "
            f"the data dir's {SECRET_FILE} file"
        )
    return secret or None


class Authenticator:
    """
    Checks ``session.auth`` tokens and keeps unauthenticated sessions out.

    @param secret: the daemon secret; agent tokens are derived from it.
    @param host_token: the token of the host role.
    @param seconds: the current time, for spacing the refusal log lines.
    Use L{Authenticator.disabled} for a daemon that accepts every session.
    """

    def __init__(
        self,
        secret: Optional[str],
        host_token: Optional[str],
        seconds: Callable[[], float] = time.monotonic,
    ):
        self.enabled = secret is not None
        self._secret = secret
        self._host_token = host_token
        self._seconds = seconds
        self._last_refusal_logged = None
        self._refusals_not_logged = 0

    @property
    def host_token(self) -> Optional[str]:
        """The host token (None with auth off): the dashboard logs in with it."""
        return self._host_token

    @classmethod
    def disabled(cls) -> "Authenticator":
        """No checking: every session is accepted (``--no-auth``)."""
        return cls(None, None)

    @classmethod
    def from_data_dir(cls, data_dir: str, environ: Mapping[str, str]) -> "Authenticator":
        """
        Load the secrets, creating the private data directory and any
        missing token file. C{CAR_AUTH_TOKEN} in C{environ} overrides the
        secret file (which is then neither read nor created).
        """
        ensure_data_dir(data_dir)
        secret = environment_secret(environ) or ensure_token(os.path.join(data_dir, SECRET_FILE))
        return cls(secret, ensure_token(os.path.join(data_dir, HOST_TOKEN_FILE)))

    def admit(self, session: Session, method: str) -> None:
        """Raise L{AuthRequired} unless C{session} may call C{method}."""
        if self.enabled and not session.authenticated and method not in OPEN_METHODS:
            raise AuthRequired("auth required: authenticate with session.auth first")

    def authenticate(self, session: Session, params: dict) -> dict:
        """
        ``session.auth``: C{{token, agent_id}}, C{{host_token}} or
        C{{token}} (the daemon secret).
        """
        agent_id = id_param(params, "agent_id")
        token = _token_param(params, "token")
        host_token = _token_param(params, "host_token")
        if host_token is not None and (token is not None or agent_id is not None):
            raise InvalidParams(
                "invalid params: send host_token alone, or token (with agent_id for an agent)"
            )
        if not self.enabled:
            if agent_id is not None:
                _bind(session, agent_id, "agent")
            answer = {"ok": True, "auth_enabled": False}
            if session.agent_id is not None:
                answer["agent_id"] = session.agent_id
            return answer
        if host_token is not None:
            self._check(session, tokens_match(host_token, self._host_token))
            _bind(session, None, "host")
            return {"ok": True, "auth_enabled": True, "role": "host"}
        if token is None:
            raise InvalidParams(
                "invalid params: session.auth needs token (with agent_id for an agent) or host_token"
            )
        if agent_id is not None:
            self._check(session, tokens_match(token, agent_token(self._secret, agent_id)))
            _bind(session, agent_id, "agent")
            return {"ok": True, "auth_enabled": True, "agent_id": agent_id}
        self._check(session, tokens_match(token, self._secret))
        _bind(session, None, None)
        return {"ok": True, "auth_enabled": True}

    def _check(self, session: Session, matched: bool) -> None:
        if matched:
            return
        session.auth_failures += 1
        self._log_refusal(session)
        if session.auth_failures >= MAX_AUTH_FAILURES:
            raise AuthFailedTooOften(
                f"auth failed: token mismatch, {session.auth_failures} times on this connection; "
                "closing it"
            )
        raise AuthFailed("auth failed: token mismatch")

    def _log_refusal(self, session: Session) -> None:
        """Log a refused token, at most once per L{AUTH_FAILURE_LOG_INTERVAL}."""
        now = self._seconds()
        last = self._last_refusal_logged
        if last is not None and now - last < AUTH_FAILURE_LOG_INTERVAL:
            self._refusals_not_logged += 1
            return
        log.warn(
            "session.auth refused for session {client_id} from {peer}: token mismatch "
            "({more} more refused since the last such line)",
            client_id=session.client_id,
            peer=session.peer,
            more=self._refusals_not_logged,
        )
        self._last_refusal_logged = now
        self._refusals_not_logged = 0


def _token_param(params: dict, name: str) -> Optional[str]:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidParams(f"invalid params: {name} must be a string")
    return value


def _bind(session: Session, agent_id: Optional[str], role: Optional[str]) -> None:
    """
    Give the session its identity. An identity, once given, never changes:
    runs recorded under one agent must not continue under another.
    """
    if session.authenticated or session.agent_id is not None:
        if (session.agent_id, session.role) != (agent_id, role):
            raise AuthFailed(
                f"auth failed: this session is already authenticated as {_identity(session)}; "
                "open a new connection for another identity"
            )
    session.agent_id = agent_id
    session.role = role
    session.authenticated = True


def _identity(session: Session) -> str:
    if session.agent_id is not None:
        return f"agent {session.agent_id!r}"
    return "host" if session.role == "host" else "the daemon (no agent)"
