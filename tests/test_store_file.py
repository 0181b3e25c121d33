"""The file store: the IRunStore conformance suite, plus what only disk shows."""

from twisted.internet import reactor
from twisted.trial import unittest

from car_twisted.store.file import FileRunStore
from tests.store_conformance import RunStoreConformance


class FileRunStoreConformanceTests(RunStoreConformance, unittest.TestCase):
    async def make_store(self):
        store = await FileRunStore.open(reactor, self.mktemp())
        self.addCleanup(store.close)
        return store
