"""Helpers the test modules share (no fixtures: those are in tests/conftest.py).

Test modules import from here, never from each other: ``from support.waiting import wait_for``
(pytest puts tests/ on sys.path, as for conftest.py). tests/test_import_rules.py checks that no
module of the tests imports a test module.
"""
