"""The one error base class: a user's mistake (a config key, a data row, a run folder, a weight file) that the
command line prints as one line naming what to fix. Anything else is a bug and keeps its traceback."""

NEW = "new_individual"  # the answer for an individual absent from the catalogue, in submissions and solutions


class ReidError(Exception):
    """Something the user can fix; the message names the file, row or key and what to do."""
