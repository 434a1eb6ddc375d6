"""The bounds of one chat-template render (time, size, work) and the checks that keep them."""

# Each check runs *before* the value it guards is built: the allocation itself is the harm.

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

# Real templates render in milliseconds; a loop that runs for seconds is a runaway.
RENDER_SECONDS: Final = 2.0
# 32 Mi characters is about 8 M tokens: more than any context window holds.
MAX_TEXT: Final = 32 * 1024 * 1024
MAX_BUILT: Final = 4 * MAX_TEXT
# Items of one list a template builds (a list costs 8 bytes per item before its items).
_MAX_ITEMS: Final = 1024 * 1024
# A number of 4,096 bits has 1,233 digits; no template needs a bigger one.
_MAX_INT_BITS: Final = 4096
_NUMBERS: Final = re.compile(r"\d+")
_PERCENT_SPEC: Final = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


class LimitExceeded(Exception):
    """A render went past one of its bounds (the message says which)."""


@dataclass
class Budget:
    """What one render may still spend."""

    deadline: float
    built: int = 0
    sizes: dict[int, tuple[object, int]] = field(default_factory=dict)

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise LimitExceeded(f"it ran longer than {RENDER_SECONDS:g} seconds")

    def build(self, size: int) -> None:
        self.built += size
        if size > MAX_TEXT or self.built > MAX_BUILT:
            raise LimitExceeded(
                f"it builds more than {MAX_TEXT if size > MAX_TEXT else MAX_BUILT:,} "
                "characters (too large)"
            )

    def fits(self, size: int, what: str = "a value") -> None:
        """Refuse, before it is made, ``what`` of ``size`` characters or items."""
        if size > MAX_TEXT:
            raise LimitExceeded(f"{what} would be more than {MAX_TEXT:,} characters (too large)")

    def printed(self, value: object) -> int:
        """About how many characters ``value`` takes printed (counting stops past MAX_TEXT)."""
        total = 0
        stack = [value]
        while stack and total <= MAX_TEXT:
            item = stack.pop()
            if isinstance(item, str | bytes):
                total += len(item)
            elif isinstance(item, bool) or item is None:
                total += 5
            elif isinstance(item, int):
                total += item.bit_length() // 3 + 1
            elif isinstance(item, float):
                total += 24
            elif isinstance(item, list | tuple | dict | set | frozenset):
                cached = self.sizes.get(id(item))
                if cached is not None and cached[0] is item:
                    total += cached[1]
                    continue
                size = self.printed_container(item)
                self.sizes[id(item)] = (item, size)  # holding it keeps its id unique
                total += size
            else:
                total += 16 + self.printed(_namespace_attributes(item))
        return total

    def printed_container(self, items: Iterable[Any]) -> int:
        if isinstance(items, dict):
            return 2 + sum(self.printed(k) + self.printed(v) + 4 for k, v in items.items())
        total = 2
        for item in items:
            total += self.printed(item) + 2
            if total > MAX_TEXT:
                break
        return total


def _namespace_attributes(value: object) -> dict[str, Any]:
    """What a ``namespace()`` holds (it prints them): jinja2.utils.Namespace keeps them in
    a private dict. Read past ``__getattr__``, which an undefined value answers by failing."""
    try:
        attrs = object.__getattribute__(value, "_Namespace__attrs")
    except AttributeError:
        return {}
    return attrs if isinstance(attrs, dict) else {}


_current: contextvars.ContextVar[Budget | None] = contextvars.ContextVar(
    "bastion_template_budget", default=None
)


def current_budget() -> Budget:
    """The budget of the render under way (a fresh one where none is: e.g. Jinja folding
    constants while it compiles outside ``bounded``)."""
    budget = _current.get()
    return budget if budget is not None else Budget(time.monotonic() + RENDER_SECONDS)


@contextlib.contextmanager
def bounded() -> Iterator[Budget]:
    """A fresh budget for the work done inside (one compile, or one render)."""
    budget = Budget(time.monotonic() + RENDER_SECONDS)
    token = _current.set(budget)
    try:
        yield budget
    finally:
        _current.reset(token)


def built_size(value: object) -> int:
    """The size of what an operation allocated (its items are counted where made)."""
    if isinstance(value, str | bytes | list | tuple | dict | set | frozenset):
        return len(value)
    if isinstance(value, int):
        return value.bit_length() // 8
    return 0


def _check_int(n: object, what: str) -> None:
    if isinstance(n, int) and n > MAX_TEXT:
        raise LimitExceeded(f"{what} {n:,} is more than {MAX_TEXT:,} (too large)")


def _check_format(fmt: str, args: Sequence[object], braces: bool) -> None:
    """Widths and precisions in a ``%`` string (``'%99999999d'``) or, with ``braces``, a
    ``str.format`` string (``'{:99999999}'``)."""
    budget = current_budget()
    if braces:
        specs = [spec or "" for _, _, spec, _ in string.Formatter().parse(fmt)]
    else:
        specs = [m.group(0) for m in _PERCENT_SPEC.finditer(fmt)]
    widths = sum(int(n) for spec in specs for n in _NUMBERS.findall(spec))
    if any("*" in s or "{" in s for s in specs):  # widths taken from the arguments
        widths += sum(abs(a) for a in args if isinstance(a, int))
    budget.fits(widths + len(fmt), "formatted text")


def check_binop(op: str, left: Any, right: Any) -> None:
    budget = current_budget()
    if op == "*" and isinstance(left, int) and not isinstance(right, int):
        left, right = right, left
    if op == "*" and isinstance(right, int) and right > 0:
        if isinstance(left, int):
            if left.bit_length() + right.bit_length() > _MAX_INT_BITS:
                raise LimitExceeded(f"a number of more than {_MAX_INT_BITS} bits (too large)")
        elif isinstance(left, str | bytes | list | tuple):
            budget.fits(budget.printed(left) * right, "a repeated value")
            if isinstance(left, list | tuple) and len(left) * right > _MAX_ITEMS:
                raise LimitExceeded(f"a list of more than {_MAX_ITEMS:,} items (too large)")
    elif op == "**" and isinstance(left, int) and isinstance(right, int) and right > 0:
        if abs(left) > 1 and right * (abs(left).bit_length() - 1) > _MAX_INT_BITS:
            raise LimitExceeded(f"a number of more than {_MAX_INT_BITS} bits (too large)")
    elif op == "+" and isinstance(left, str | bytes | list | tuple):
        budget.fits(budget.printed(left) + budget.printed(right), "a joined value")
    elif op == "%" and isinstance(left, str):
        _check_format(left, right if isinstance(right, tuple) else (right,), braces=False)


def check_call(function: Any, args: Sequence[Any]) -> None:
    """A call's arguments, before it runs: containers must fit, and so must what a string
    method can make of its string."""
    budget = current_budget()
    target = getattr(function, "__wrapped__", function)  # the sandbox wraps str.format
    owner = getattr(target, "__self__", None)
    if isinstance(owner, str | bytes):
        _check_string_method(owner, getattr(target, "__name__", ""), args)
    for value in args:
        if isinstance(value, list | tuple | dict | set):
            budget.fits(budget.printed(value), "an argument")


def _check_string_method(owner: str | bytes, name: str, args: Sequence[Any]) -> None:
    """Methods of str whose result can outgrow the string (``'x'.ljust(10**10)``)."""
    budget = current_budget()
    if name in ("center", "ljust", "rjust", "zfill") and args:
        _check_int(args[0], "a width of")
    elif name == "expandtabs" and args and isinstance(args[0], int):
        tabs = owner.count("\t") if isinstance(owner, str) else owner.count(b"\t")
        budget.fits(len(owner) + tabs * args[0], "the expanded text")
    elif name == "replace" and len(args) >= 2:
        _check_replace(owner, args[0], args[1], args[2] if len(args) > 2 else -1)
    elif name in ("format", "format_map") and isinstance(owner, str):
        mapping = args[0] if name == "format_map" and args and isinstance(args[0], dict) else {}
        _check_format(owner, [*args, *mapping.values()], braces=True)


def _check_replace(text: object, old: object, new: object, count: object) -> None:
    if isinstance(text, bytes) and isinstance(old, bytes):  # latin-1: one char per byte
        text, old = text.decode("latin-1"), old.decode("latin-1")
    if not isinstance(text, str) or not isinstance(old, str):
        return  # not a replacement Python would make: it raises on its own
    times = text.count(old) if old else len(text) + 1
    if isinstance(count, int) and count >= 0:
        times = min(times, count)
    budget = current_budget()
    budget.fits(len(text) + times * budget.printed(new), "the replaced text")


class BoundedIter(Iterator[Any]):
    """Iterates ``items``, checking the time at every step and counting what it hands out."""

    def __init__(self, items: Iterable[Any], limit: int | None = None) -> None:
        self._items = iter(items)
        self._budget = current_budget()
        self._left = limit

    def __next__(self) -> Any:
        self._budget.tick()
        if self._left is not None:
            if self._left <= 0:
                raise LimitExceeded(f"a list of more than {_MAX_ITEMS:,} items (too large)")
            self._left -= 1
        return next(self._items)


# Filters that read their whole input into a list.
_MATERIALIZE: Final = frozenset(
    {"list", "unique", "sort", "reverse", "batch", "slice", "groupby", "dictsort", "join",
     "sum", "min", "max", "random", "map", "select", "reject", "selectattr", "rejectattr"}
)  # fmt: skip


# Filters with arguments that can multiply the size of their result.
_SIZING: Final = frozenset(
    {"center", "indent", "wordwrap", "format", "replace", "batch", "slice", "sum", "tojson"}
)


def _check_filter(name: str, args: list[Any], kwargs: dict[str, Any]) -> None:
    """Checks a filter's arguments before it runs; may replace ``args[0]`` by a list."""
    value = args[0] if args else None
    if name not in _SIZING and name not in _MATERIALIZE and not isinstance(value, list | dict):
        return  # the common case: a string filter on a string, linear in its input
    budget = current_budget()

    def arg(position: int, key: str, default: Any = None) -> Any:
        return args[position] if len(args) > position else kwargs.get(key, default)

    if name in _MATERIALIZE and isinstance(value, str | bytes) and len(value) > _MAX_ITEMS:
        raise LimitExceeded(f"a list of more than {_MAX_ITEMS:,} items (too large)")
    if name in _MATERIALIZE and value is not None and not hasattr(value, "__len__"):
        args[0] = list(BoundedIter(value, _MAX_ITEMS))  # a generator: count as it is read
        value = args[0]
    if isinstance(value, list | tuple | dict | set):
        budget.fits(budget.printed(value), "the filter's input")
    if name == "center":
        _check_int(arg(1, "width"), "a width of")
    elif name == "indent":
        width = arg(1, "width", 4)
        per_line = width if isinstance(width, int) else budget.printed(width)
        lines = str(value).count("\n") + 1 if isinstance(value, str) else 1
        budget.fits(budget.printed(value) + lines * per_line, "the indented text")
    elif name == "wordwrap" and isinstance(value, str):
        width, wrap = arg(1, "width", 79), arg(3, "wrapstring") or "\n"
        breaks = len(value) // max(width if isinstance(width, int) else 1, 1) + 1
        budget.fits(len(value) + (breaks + value.count("\n")) * budget.printed(wrap), "the text")
    elif name == "format" and isinstance(value, str):
        _check_format(value, [*args[1:], *kwargs.values()], braces=False)
    elif name == "replace":
        _check_replace(value, arg(1, "old"), arg(2, "new"), arg(3, "count"))
    elif name == "join" and isinstance(value, list | tuple):
        separator = budget.printed(arg(1, "d", ""))
        budget.fits(budget.printed(value) + separator * len(value), "the joined text")
    elif name in ("batch", "slice"):
        count = arg(1, "linecount" if name == "batch" else "slices")
        if isinstance(count, int) and count > _MAX_ITEMS:
            raise LimitExceeded(f"a list of more than {_MAX_ITEMS:,} items (too large)")
    elif name == "sum" and not isinstance(arg(2, "start", 0), int | float):
        # sum() of lists copies every partial result (quadratic, in one C call that no
        # deadline interrupts); from a number it adds numbers, or fails at the first list.
        raise LimitExceeded("sum() that starts from something other than a number")
    elif name == "tojson":  # Hugging Face's: tojson(x, ensure_ascii, indent, separators)
        _check_json(value, arg(1, "ensure_ascii"), arg(2, "indent"), arg(3, "separators"))


def _check_json(value: Any, ascii_only: object, indent: object, separators: object) -> None:
    """The size of ``tojson``'s text, before it is made: an indent grows with the depth."""
    budget = current_budget()
    step = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    gaps = 4  # ", " and ": "
    if isinstance(separators, list | tuple):
        gaps = sum(len(s) for s in separators if isinstance(s, str))
    total, stack = 0, [(value, 1)]
    while stack and total <= MAX_TEXT:
        budget.tick()  # a list that holds one big list many times is walked many times
        item, depth = stack.pop()
        if isinstance(item, dict | list | tuple):
            items = [*item.keys(), *item.values()] if isinstance(item, dict) else list(item)
            total += 2 + len(items) * (gaps + 1 + max(step, 0) * depth)
            stack += [(child, depth + 1) for child in items]
        elif isinstance(item, str):
            total += _json_string_size(item, bool(ascii_only))
        else:
            total += 2 + budget.printed(item)
    budget.fits(total, "the JSON text")


# A str.translate table that drops the control characters (JSON escapes them).
_CONTROLS: Final = dict.fromkeys(range(32))


def _json_string_size(text: str, ascii_only: bool) -> int:
    """At most how many characters ``text`` takes as a JSON string: quotes, and escapes
    (``\\"``, ``\\u001f``; with ``ascii_only``, 12 for a character past U+FFFF)."""
    size = len(text) + 2 + text.count('"') + text.count("\\")
    size += 5 * (len(text) - len(text.translate(_CONTROLS)))
    if ascii_only and not text.isascii():
        size += 11 * (len(text) - len(text.encode("ascii", "ignore")))
    return size


def bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    # Filters that take the context, eval context or environment first carry this mark.
    skip = 1 if hasattr(function, "jinja_pass_arg") else 0

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = current_budget()
        budget.tick()
        rest = list(args[skip:])
        _check_filter(name, rest, kwargs)
        result = function(*args[:skip], *rest, **kwargs)
        budget.build(built_size(result))
        return result

    return bounded
