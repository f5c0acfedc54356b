"""Errors that the CLI turns into one line on stderr and exit status 2."""


class InputError(Exception):
    """Bad input from the user: a file, an option, a model fibgraph cannot map."""


class HierarchyViolation(Exception):
    """A symmetry level does not refine the level it must refine."""
