"""
The daemon's secrets on disk and the tokens derived from them.
"""

import os
import re
import stat

from twisted.trial import unittest

from car_twisted.auth import (
    HOST_TOKEN_FILE,
    SECRET_FILE,
    Authenticator,
    TokenFileError,
    agent_token,
    daemon_secret,
    ensure_token,
    new_token,
    tokens_match,
)
from tests.support import private_dir

_BASE64URL_43 = re.compile(r"^[A-Za-z0-9_-]{43}$")


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def read(path) -> str:
    with open(path) as f:
        return f.read().strip()


class AgentTokenTests(unittest.TestCase):
    def test_known_answer(self):
        """agent_token is base64url-nopad(HMAC-SHA256(secret, "agent:" + id)),
        checked against vectors computed with openssl, UTF-8 included."""
        self.assertEqual(
            agent_token("test-secret-0123456789", "agent-A"),
            "u7faiBrBD2fTpwcsbJf0brMCZHqEjqUgt_01nbrnkOc",
        )
        self.assertEqual(agent_token("sécret", "ü"), "GzHv844kZ5h9_3h4VDMbuPy9cadeZ4glpn9S6ZAHzOk")

    def test_tokens_differ_by_agent_and_secret(self):
        """A token is specific to one agent under one secret."""
        self.assertNotEqual(agent_token("s", "agent-A"), agent_token("s", "agent-B"))
        self.assertNotEqual(agent_token("s1", "agent-A"), agent_token("s2", "agent-A"))

    def test_new_token_shape(self):
        """New tokens are 43 base64url characters (32 random bytes), never repeated."""
        tokens = {new_token() for _ in range(20)}
        self.assertEqual(len(tokens), 20)
        for token in tokens:
            self.assertRegex(token, _BASE64URL_43)

    def test_comparison_accepts_hostile_text(self):
        """Comparing a non-ASCII guess is a mismatch, not a crash."""
        self.assertFalse(tokens_match("tökén\x00", "token"))
        self.assertTrue(tokens_match("same", "same"))


class SecretFileTests(unittest.TestCase):
    def test_first_start_creates_private_files(self):
        """The data dir is created 0700 and both token files 0600, each holding
        a 43-character token, even under a permissive umask."""
        data_dir = os.path.join(private_dir(self), "car")
        old_umask = os.umask(0)
        try:
            Authenticator.from_data_dir(data_dir, {})
        finally:
            os.umask(old_umask)
        self.assertEqual(mode(data_dir), 0o700)
        for name in (SECRET_FILE, HOST_TOKEN_FILE):
            path = os.path.join(data_dir, name)
            self.assertEqual(mode(path), 0o600, name)
            self.assertRegex(read(path), _BASE64URL_43)
        self.assertNotEqual(
            read(os.path.join(data_dir, SECRET_FILE)), read(os.path.join(data_dir, HOST_TOKEN_FILE))
        )
        self.assertEqual(sorted(os.listdir(data_dir)), [SECRET_FILE, HOST_TOKEN_FILE])

    def test_later_starts_keep_the_secrets(self):
        """A second start reads the same secrets, so issued tokens stay valid."""
        data_dir = private_dir(self)
        first = Authenticator.from_data_dir(data_dir, {})
        secret = read(os.path.join(data_dir, SECRET_FILE))
        second = Authenticator.from_data_dir(data_dir, {})
        self.assertEqual(read(os.path.join(data_dir, SECRET_FILE)), secret)
        self.assertEqual(first._secret, second._secret)
        self.assertEqual(first._host_token, second._host_token)

    def test_environment_overrides_secret(self):
        """CAR_AUTH_TOKEN is the secret: no secret file is made, and the CLI's
        lookup prefers it too; the host token still comes from its file."""
        data_dir = private_dir(self)
        environ = {"CAR_AUTH_TOKEN": "from-the-environment"}
        authenticator = Authenticator.from_data_dir(data_dir, environ)
        self.assertEqual(authenticator._secret, "from-the-environment")
        self.assertFalse(os.path.exists(os.path.join(data_dir, SECRET_FILE)))
        self.assertEqual(mode(os.path.join(data_dir, HOST_TOKEN_FILE)), 0o600)
        self.assertEqual(daemon_secret(data_dir, environ), "from-the-environment")

    def test_short_environment_secret_is_refused(self):
        """A CAR_AUTH_TOKEN under 16 bytes is refused, by the daemon and by
        the CLI's lookup, with a message naming it and nothing made; 16
        bytes is enough."""
        data_dir = private_dir(self)
        for short in ("x", "é" * 7 + "a"):
            environ = {"CAR_AUTH_TOKEN": short}
            error = self.assertRaises(TokenFileError, Authenticator.from_data_dir, data_dir, environ)
            self.assertIn("$CAR_AUTH_TOKEN is", str(error))
            self.assertIn("at least 16", str(error))
            self.assertRaises(TokenFileError, daemon_secret, data_dir, environ)
        self.assertEqual(os.listdir(data_dir), [])
        enough = {"CAR_AUTH_TOKEN": "é" * 8}
        self.assertEqual(Authenticator.from_data_dir(data_dir, enough)._secret, "é" * 8)

    def test_empty_environment_variable_is_ignored(self):
        """An empty CAR_AUTH_TOKEN is not a secret: the file is used."""
        data_dir = private_dir(self)
        authenticator = Authenticator.from_data_dir(data_dir, {"CAR_AUTH_TOKEN": ""})
        self.assertEqual(authenticator._secret, read(os.path.join(data_dir, SECRET_FILE)))

    def test_readable_by_others_is_refused(self):
        """A token file others may read is refused (its token may have
        leaked), with a message saying what to do."""
        data_dir = private_dir(self)
        path = os.path.join(data_dir, SECRET_FILE)
        ensure_token(path)
        os.chmod(path, 0o644)
        error = self.assertRaises(TokenFileError, Authenticator.from_data_dir, data_dir, {})
        self.assertIn("delete the file", str(error))

    def test_empty_file_is_refused(self):
        """An empty token file is an error, not an empty secret."""
        path = os.path.join(private_dir(self), SECRET_FILE)
        os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        self.assertRaises(TokenFileError, ensure_token, path)

    def test_existing_file_wins(self):
        """ensure_token never replaces a token that exists (another process
        may have created it first), and leaves no temporary file."""
        directory = private_dir(self)
        path = os.path.join(directory, SECRET_FILE)
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        os.write(fd, b"already-here\n")
        os.close(fd)
        self.assertEqual(ensure_token(path), "already-here")
        self.assertEqual(os.listdir(directory), [SECRET_FILE])

    def test_secret_lookup_without_file(self):
        """Without CAR_AUTH_TOKEN or a secret file, the lookup says the file is missing."""
        self.assertRaises(FileNotFoundError, daemon_secret, private_dir(self), {})
