"""Implementations of L{car_twisted.interfaces.IRunStore}."""
