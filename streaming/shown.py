"""How a value a client sent wrong is repeated in the error it gets back
(the LLM engine server's sampling fields, a carrier's stream metadata)."""

from __future__ import annotations


def shown_value(value: object) -> str:
    """A wrong value as an error repeats it: a string cut short, any other
    kind by its type (the repr of a list nested 900 deep recursed past
    Python's limit, and ended the call as an internal error)."""
    if isinstance(value, str):
        return repr(value[:60])
    if value is None or isinstance(value, bool | int | float):
        return repr(value)[:60]
    kind = {list: "array", dict: "object"}.get(type(value), type(value).__name__)
    return f"a JSON {kind}"
