"""The C{list_runs} cursors that are positions, shared by the stores that use them."""


def parse_position_cursor(cursor, upper: int) -> int:
    """
    Read a C{list_runs} cursor that is a position in a sequence of C{upper}
    runs: the page starts below it.
    """
    if cursor is None:
        return upper
    if not (isinstance(cursor, str) and cursor.isdigit() and int(cursor) <= upper):
        raise ValueError(f"unreadable cursor {cursor!r}")
    return int(cursor)
