"""Plain helpers shared by several test modules (fixtures live in conftest.py).

A test module imports them from here, never from another test module.
"""
