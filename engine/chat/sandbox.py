"""A bounded Jinja sandbox for chat templates: time, size and work limits on one render.

A template comes from a model file, which anyone can write. It is rendered in Jinja's
immutable sandbox (no Python internals, no changes to lists and dicts), and within bounds,
so that a runaway template fails at once instead of exhausting memory or hanging (in the
CLI, Ctrl-C only asks the work to stop, so a render that never returned could not be
stopped at all):

- time: ``RENDER_SECONDS``, checked at every loop step, call, filter, operator, attribute
  access and output piece;
- size: no value the template builds, and not the prompt, may exceed ``MAX_TEXT``
  characters. What can multiply a size (``*``, ``**``, ``+``, ``~``, ``%`` and format
  widths, width arguments of filters and string methods, ``replace``, ``join``, ``batch``,
  ``sum``, printing a list) is checked *before* it runs: the allocation itself is the harm;
- work: all the text and items built in one render count against ``MAX_BUILT``, which
  bounds loops that build big values and throw them away.

The bounds use Jinja's own sandbox hooks (``intercepted_binops``, ``call``, ``getattr``,
``finalize``) plus one small rewrite of the template's tree before compiling (loops and
``~`` go through a check), because a loop and a concatenation reach no hook.
``engine.chat.templates`` turns every failure into one error naming the model.
"""

from __future__ import annotations

import contextvars
import functools
import json
import re
import string
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
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


class TemplateRaised(Exception):
    """The template itself refused the messages (``raise_exception``)."""


class LimitExceeded(Exception):
    """A render went past one of its bounds (the message says which)."""


def _raise_exception(message: str) -> None:
    raise TemplateRaised(message)


@dataclass
class _Budget:
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


_current: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "bastion_template_budget", default=None
)


def _budget() -> _Budget:
    budget = _current.get()
    # Outside a render: Jinja folds constant expressions while compiling.
    return budget if budget is not None else _Budget(time.monotonic() + RENDER_SECONDS)


def _built_size(value: object) -> int:
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
    budget = _budget()
    if braces:
        specs = [spec or "" for _, _, spec, _ in string.Formatter().parse(fmt)]
    else:
        specs = [m.group(0) for m in _PERCENT_SPEC.finditer(fmt)]
    widths = sum(int(n) for spec in specs for n in _NUMBERS.findall(spec))
    if any("*" in s or "{" in s for s in specs):  # widths taken from the arguments
        widths += sum(abs(a) for a in args if isinstance(a, int))
    budget.fits(widths + len(fmt), "formatted text")


def _check_binop(op: str, left: Any, right: Any) -> None:
    budget = _budget()
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


def _check_string_method(owner: str | bytes, name: str, args: Sequence[Any]) -> None:
    """Methods of str whose result can outgrow the string (``'x'.ljust(10**10)``)."""
    budget = _budget()
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
    _budget().fits(len(text) + times * _budget().printed(new), "the replaced text")


class _BoundedIter(Iterator[Any]):
    """Iterates ``items``, checking the time at every step and counting what it hands out."""

    def __init__(self, items: Iterable[Any], limit: int | None = None) -> None:
        self._items = iter(items)
        self._budget = _budget()
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
    budget = _budget()

    def arg(position: int, key: str, default: Any = None) -> Any:
        return args[position] if len(args) > position else kwargs.get(key, default)

    if name in _MATERIALIZE and isinstance(value, str | bytes) and len(value) > _MAX_ITEMS:
        raise LimitExceeded(f"a list of more than {_MAX_ITEMS:,} items (too large)")
    if name in _MATERIALIZE and value is not None and not hasattr(value, "__len__"):
        args[0] = list(_BoundedIter(value, _MAX_ITEMS))  # a generator: count as it is read
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
    elif name == "tojson":
        indent = arg(1, "indent")
        width = len(indent) if isinstance(indent, str) else indent
        if isinstance(width, int) and width > 64:
            raise LimitExceeded("a JSON indent of more than 64 (too large)")


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    # Filters that take the context, eval context or environment first carry this mark.
    skip = 1 if hasattr(function, "jinja_pass_arg") else 0

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        rest = list(args[skip:])
        _check_filter(name, rest, kwargs)
        result = function(*args[:skip], *rest, **kwargs)
        budget.build(_built_size(result))
        return result

    return bounded


@functools.cache
def _environment() -> Any:
    """The one bounded sandbox every template compiles in (Jinja is imported on first use)."""
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator, Frame
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.visitor import NodeTransformer

    def env_call(name: str, node: nodes.Node, *args: Any) -> nodes.Call:
        call = nodes.Call(nodes.EnvironmentAttribute(name), list(args), [], None, None)
        call.set_lineno(node.lineno)
        return call

    class BoundLoopsAndConcat(NodeTransformer):
        """Sends every loop, ``~`` and non-constant literal through a check."""

        # generic_visit transforms the children in place and returns the node itself.
        def visit_For(self, node: nodes.For) -> nodes.Node:
            self.generic_visit(node)
            node.iter = env_call("bounded_iter", node, node.iter)
            return node

        def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
            self.generic_visit(node)
            return env_call("bounded_concat", node, *node.nodes)

        def literal(self, node: nodes.Expr) -> nodes.Node:
            self.generic_visit(node)
            try:
                node.as_const()
            except nodes.Impossible:
                return env_call("bounded_value", node, node)
            return node

        visit_List = visit_Tuple = visit_Dict = literal

    class BoundedCodeGenerator(CodeGenerator):
        def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
            super().visit_Template(BoundLoopsAndConcat().visit(node), frame)

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """Jinja's immutable sandbox, with every hook checking the render's bounds."""

        intercepted_binops = frozenset({"*", "**", "+", "%"})
        code_generator_class = BoundedCodeGenerator

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            budget = _budget()
            budget.tick()
            _check_binop(operator, left, right)
            result = super().call_binop(context, operator, left, right)
            budget.build(_built_size(result))
            return result

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            budget = _budget()
            budget.tick()
            target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
            owner = getattr(target, "__self__", None)
            if isinstance(owner, str | bytes):
                name = getattr(target, "__name__", "")
                _check_string_method(owner, name, [*args, *kwargs.values()])
            for value in (*args, *kwargs.values()):
                if isinstance(value, list | tuple | dict | set):
                    budget.fits(budget.printed(value), "an argument")
            result = super().call(__context, __obj, *args, **kwargs)
            budget.build(_built_size(result))
            return result

        def getattr(self, obj: Any, attribute: str) -> Any:
            _budget().tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            _budget().tick()
            return super().getitem(obj, argument)

        def concat(self, pieces: Iterable[str]) -> str:
            # Joins the output of a macro or of a {% set %} block.
            pieces = list(pieces)
            _budget().fits(sum(len(p) for p in pieces), "a block's text")
            return "".join(pieces)

        def bounded_iter(self, items: Iterable[Any]) -> Iterator[Any]:
            return _BoundedIter(items)

        def bounded_concat(self, *values: Any) -> str:
            budget = _budget()
            budget.fits(sum(budget.printed(v) for v in values), "a joined text")
            text = "".join(map(str, values))
            budget.build(len(text))
            return text

        def bounded_value(self, value: Any) -> Any:
            _budget().fits(_budget().printed(value), "a list")
            return value

    def bounded_output(value: Any) -> Any:
        budget = _budget()
        budget.tick()
        if not isinstance(value, str):
            budget.fits(budget.printed(value), "a printed value")
        return value

    # The same options as Hugging Face's apply_chat_template, which is what template
    # authors test against.
    env = BoundedSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=["jinja2.ext.loopcontrols"],
        finalize=bounded_output,
    )
    env.globals.pop("lipsum", None)  # makes text of any size; no chat template uses it
    env.filters["tojson"] = lambda value, indent=None: json.dumps(
        value, ensure_ascii=False, indent=indent
    )
    env.filters = {name: _bounded_filter(name, f) for name, f in env.filters.items()}
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


@functools.cache
def compile_template(source: str) -> Any:
    # Constant expressions are evaluated while compiling: they are bounded as well.
    token = _current.set(_Budget(time.monotonic() + RENDER_SECONDS))
    try:
        return _environment().from_string(source)
    finally:
        _current.reset(token)


def render_bounded(template: Any, **context: Any) -> str:
    """Render a compiled template within the bounds.

    Raises:
        TemplateRaised: the template called ``raise_exception``.
        LimitExceeded: it went past a bound in time or size.
        Exception: anything else it did wrong (``1/0``, a missing key).
    """
    budget = _Budget(time.monotonic() + RENDER_SECONDS)
    token = _current.set(budget)
    pieces: list[str] = []
    size = 0
    try:
        for piece in template.generate(**context):
            budget.tick()
            size += len(piece)
            budget.fits(size, "the prompt")
            pieces.append(piece)
    finally:
        _current.reset(token)
    return "".join(pieces)
