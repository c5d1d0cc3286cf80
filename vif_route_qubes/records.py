"""`class X(NamedTuple)` as with typing, without importing typing.

Importing typing costs ~3.5 ms of every event's ~45 ms start-up, for one
class.  This builds the same kind of record from the class body: fields
from the annotations (in order, defaults from the assignments after them),
made by collections.namedtuple; methods, properties and the docstring on
a subclass with no instance dict, so records stay immutable tuples.
"""

from collections import namedtuple


class _RecordMeta(type):
    def __new__(mcs, name, bases, body):
        if not bases:  # NamedTuple itself
            return super().__new__(mcs, name, bases, body)
        fields = list(body.get("__annotations__", {}))
        defaults = [body[f] for f in fields if f in body]
        if any(f not in body for f in fields[len(fields) - len(defaults):]):
            raise TypeError(f"{name}: a field without a default follows one with a default")
        base = namedtuple(name, fields, defaults=defaults, module=body.get("__module__"))
        rest = {k: v for k, v in body.items() if k not in fields}
        rest["__slots__"] = ()
        return type.__new__(type, name, (base,), rest)


class NamedTuple(metaclass=_RecordMeta):
    """Base of a record class; see the module's docstring."""
