"""Conformance suites shipped with the package, for evomerge's own tests and for plugin authors."""
