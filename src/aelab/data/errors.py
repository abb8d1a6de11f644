"""The one exception type the data layer raises for problems a user can fix."""


class DataError(Exception):
    """A user-facing data problem; str(e) is one clear line."""
