"""The memory store passes the IRunStore conformance suite."""

from twisted.trial import unittest

from car_twisted.store.memory import MemoryRunStore
from tests.store_conformance import RunStoreConformance


class MemoryRunStoreTests(RunStoreConformance, unittest.TestCase):
    def make_store(self):
        return MemoryRunStore()
