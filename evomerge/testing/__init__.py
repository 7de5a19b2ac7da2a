"""Conformance suites shipped with evomerge, as Optuna ships ``optuna.testing``.

Each ``*_suite`` module holds pytest test classes that every registered entry of one family
passes (the registry is enrolled automatically) and that a plugin author subclasses to check their
own strategy, merge method, fitness function, executor or worker. The suites import pytest themselves, so importing
``evomerge`` never needs it; pytest comes with the ``dev`` extra.
"""
