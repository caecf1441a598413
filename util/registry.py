"""Name → constructor lookup with an error that lists what exists."""
from typing import Callable, Dict, List

from util.errors import UserError


class UnknownModelError(UserError, ValueError):
    """Raised for a model name that no constructor is registered under."""


def register(table: Dict[str, Callable], *names: str) -> Callable:
    """Decorator: register the constructor under its own name and any aliases."""
    def wrap(fn: Callable) -> Callable:
        table[fn.__name__] = fn
        for alias in names:
            table[alias] = fn
        return fn
    return wrap


def lookup(table: Dict[str, Callable], name: str, kind: str) -> Callable:
    """Return table[name] or raise UnknownModelError naming the available choices."""
    if name not in table:
        raise UnknownModelError(
            f"unknown {kind} model '{name}'; choose one of: {', '.join(sorted(table))}"
        )
    return table[name]


def names(table: Dict[str, Callable]) -> List[str]:
    """Sorted registered names."""
    return sorted(table)
