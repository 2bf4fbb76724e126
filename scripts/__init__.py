"""The commands a user runs (python scripts/NAME.py); a package so that the tests import their functions."""
