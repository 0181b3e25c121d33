"""The C{list_runs} cursors, shared by the stores that use each kind."""

#: The largest run sequence number an SQL store hands out.
MAX_SEQ = 2**63 - 1


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


def parse_seq_cursor(cursor) -> int:
    """
    Read a C{list_runs} cursor that is a run sequence number (the SQL
    stores'): the page starts below it.
    """
    if cursor is None:
        return MAX_SEQ
    if isinstance(cursor, str) and cursor.isascii() and cursor.isdigit():
        seq = int(cursor)
        if 0 < seq <= MAX_SEQ:
            return seq
    raise ValueError(f"unreadable cursor {cursor!r}")
