"""The PostgreSQL store: the IRunStore conformance suite, then what is its own."""

from twisted.internet import reactor
from twisted.trial import unittest

from car_twisted.store.postgresql import PostgresRunStore
from tests.postgres_server import fresh_database
from tests.store_conformance import RunStoreConformance


class PostgresRunStoreConformanceTests(RunStoreConformance, unittest.TestCase):
    async def make_store(self):
        store = await PostgresRunStore.open(reactor, fresh_database(self))
        self.addCleanup(store.close)
        return store
