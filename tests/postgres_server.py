"""
A throwaway PostgreSQL server for the tests, shared by the whole test
process (pytest or trial): started on first use with the machine's own
binaries, stopped (C{pg_ctl -m fast}) and deleted at exit.

C{CAR_TEST_DSN} in the environment names an existing server to use instead
(its role must be allowed to create databases). Each test gets a database of
its own from L{fresh_database}. Under CI (C{CI=true}) a missing PostgreSQL
fails the tests; elsewhere they are skipped, saying so.
"""

import atexit
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import unittest
import uuid

import psycopg
from psycopg import sql

DSN_ENV = "CAR_TEST_DSN"
_server = None  # the admin DSN, once known


def _binaries():
    """The newest installed PostgreSQL's bin directory, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_major)
    return os.path.dirname(found[-1]) if found else None


def _major(path):
    version = path.split("/")[-3]
    return int(version) if version.isdigit() else 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_owner(command):
    """Run C{command} as the postgres user when we are root (initdb refuses root)."""
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    subprocess.run(command, check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def start_server(fsync: bool = False) -> tuple:
    """
    Start a server in a new temporary directory on a free loopback port.

    @param fsync: C{False} (the tests' default) trades crash safety of the
        throwaway cluster for speed; benchmarks pass C{True}.
    @return: C{(dsn, stop)}: the superuser DSN and a function that stops the
        server and deletes its directory.
    """
    bin_dir = _binaries()
    if bin_dir is None:
        raise FileNotFoundError("no /usr/lib/postgresql/*/bin/initdb")
    root = tempfile.mkdtemp(prefix="car-postgres-")
    data = os.path.join(root, "data")
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
    os.chmod(root, 0o700)
    _as_owner([os.path.join(bin_dir, "initdb"), "-D", data, "-U", "postgres",
               "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"])  # fmt: skip
    port = _free_port()
    settings = (
        f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={root}"
        f" -c fsync={'on' if fsync else 'off'} -c max_connections=300"
    )
    pg_ctl = os.path.join(bin_dir, "pg_ctl")
    _as_owner([pg_ctl, "-D", data, "-o", settings, "-l", os.path.join(root, "log"), "-w", "start"])

    def stop():
        try:
            _as_owner([pg_ctl, "-D", data, "-m", "fast", "-w", "stop"])
        finally:
            shutil.rmtree(root, ignore_errors=True)

    return f"host=127.0.0.1 port={port} user=postgres dbname=postgres", stop


def server_dsn() -> str:
    """
    The admin DSN of the tests' server, starting it on first use.

    @raise unittest.SkipTest: outside CI, when there is no PostgreSQL.
    """
    global _server
    if _server is None:
        if os.environ.get(DSN_ENV):
            _server = os.environ[DSN_ENV]
        else:
            try:
                _server, stop = start_server()
            except FileNotFoundError:
                if os.environ.get("CI") == "true":
                    raise
                raise unittest.SkipTest(
                    "no PostgreSQL found (no /usr/lib/postgresql/*/bin/initdb and no "
                    f"${DSN_ENV}); install postgresql or set {DSN_ENV} to run these tests"
                )
            atexit.register(stop)
    return _server


def fresh_database(case) -> str:
    """Create an empty database for C{case}, dropped after it; its DSN."""
    admin = server_dsn()
    name = "car_test_" + uuid.uuid4().hex[:12]
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop():
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(
                sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name))
            )

    case.addCleanup(drop)
    return psycopg.conninfo.make_conninfo(admin, dbname=name)
