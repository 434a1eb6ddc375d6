"""Hugging Face's chat-template environment, rebuilt so that every render stays within bounds."""

# A template comes from a model file, which anyone can write. It is rendered the way
# transformers' ``apply_chat_template`` renders it -- the environment (Jinja's immutable
# sandbox, its options, the ``{% generation %}`` extension, ``tojson``, ``raise_exception``,
# ``strftime_now``) is taken from transformers itself -- in a subclass whose hooks keep
# every render within the bounds of ``engine.chat.bounds``: a runaway template fails at
# once instead of exhausting memory or hanging (in the CLI, Ctrl-C only asks the work to
# stop, so a render that never returned could not be stopped at all).
#
# - time: checked at every loop step, call, filter, operator, attribute access and output;
# - size: no value the template builds, and not the prompt, may exceed ``MAX_TEXT``;
#   whatever can multiply a size (``*``, ``**``, ``+``, ``~``, ``%`` and format widths,
#   width arguments of filters and string methods, ``replace``, ``join``, ``batch``,
#   ``sum``, ``tojson``, printing a list) is checked *before* it runs;
# - work: all the text and items built in one render count against ``MAX_BUILT``.
#
# The hooks are Jinja's sandbox hooks (``intercepted_binops``, ``call``, ``getattr``,
# ``finalize``) plus one small rewrite of the template's tree before compiling (loops and
# ``~`` go through a check), because a loop and a concatenation reach no hook. Output is
# byte for byte what transformers renders (tests/test_chat_templates_real.py).
# ``engine.chat.templates`` turns every failure into one error naming the model.

from __future__ import annotations

import functools
import threading
from collections.abc import Iterable, Iterator
from typing import Any

from engine.chat.bounds import (
    BoundedIter,
    bounded,
    bounded_filter,
    built_size,
    check_binop,
    check_call,
    current_budget,
)


@functools.cache
def _environment() -> Any:
    """The one bounded sandbox every template compiles in: Hugging Face's chat-template
    environment with bounds (transformers and Jinja are imported on first use, ~1 s)."""
    from jinja2 import nodes
    from jinja2.compiler import CodeGenerator, Frame
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    from jinja2.visitor import NodeTransformer
    from transformers.utils.chat_template_utils import _compile_jinja_template

    # transformers makes its environment where it compiles a template: compiling an empty
    # one hands it over. A model's template is never compiled there (unbounded folding).
    reference = _compile_jinja_template("").environment

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
            if getattr(node, "ctx", "load") == "store":  # a target: {% for k, v in ... %}
                return node
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
        """Hugging Face's sandbox, with every hook checking the render's bounds."""

        intercepted_binops = frozenset({"*", "**", "+", "%"})
        code_generator_class = BoundedCodeGenerator

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            budget = current_budget()
            budget.tick()
            check_binop(operator, left, right)
            result = super().call_binop(context, operator, left, right)
            budget.build(built_size(result))
            return result

        def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
            budget = current_budget()
            budget.tick()
            check_call(__obj, [*args, *kwargs.values()])
            result = super().call(__context, __obj, *args, **kwargs)
            budget.build(built_size(result))
            return result

        def getattr(self, obj: Any, attribute: str) -> Any:
            current_budget().tick()
            return super().getattr(obj, attribute)

        def getitem(self, obj: Any, argument: Any) -> Any:
            current_budget().tick()
            return super().getitem(obj, argument)

        def concat(self, pieces: Iterable[str]) -> str:
            # Joins the output of a macro, a {% set %} block or a {% generation %} block.
            pieces = list(pieces)
            current_budget().fits(sum(len(p) for p in pieces), "a block's text")
            return "".join(pieces)

        def bounded_iter(self, items: Iterable[Any]) -> Iterator[Any]:
            return BoundedIter(items)

        def bounded_concat(self, *values: Any) -> str:
            budget = current_budget()
            budget.fits(sum(budget.printed(v) for v in values), "a joined text")
            text = "".join(map(str, values))
            budget.build(len(text))
            return text

        def bounded_value(self, value: Any) -> Any:
            budget = current_budget()
            budget.fits(budget.printed(value), "a list")
            return value

    def bounded_output(value: Any) -> Any:
        budget = current_budget()
        budget.tick()
        if not isinstance(value, str):
            budget.fits(budget.printed(value), "a printed value")
        return value

    env = BoundedSandbox(
        trim_blocks=reference.trim_blocks,
        lstrip_blocks=reference.lstrip_blocks,
        keep_trailing_newline=reference.keep_trailing_newline,
        extensions=[type(extension) for extension in reference.extensions.values()],
        finalize=bounded_output,
    )
    env.globals.update(reference.globals)  # raise_exception, strftime_now
    env.globals.pop("lipsum", None)  # makes text of any size; no chat template uses it
    env.filters = {name: bounded_filter(name, f) for name, f in reference.filters.items()}
    return env


_environment_lock = threading.Lock()


def environment() -> Any:
    """The sandbox, built once whichever thread asks first (the others wait for it)."""
    with _environment_lock:
        return _environment()


def prepare_in_background() -> None:
    """Build the sandbox on a thread now, while something else waits (a model loading in
    its host process): the first answer then does not wait ~1 s for the imports."""
    threading.Thread(target=environment, name="chat-template-import", daemon=True).start()


def refused(exc: BaseException) -> bool:
    """Whether ``exc`` is the template's own ``raise_exception``: Hugging Face's raises a
    plain ``TemplateError``, which Jinja itself never does (it raises subclasses)."""
    from jinja2.exceptions import TemplateError

    return type(exc) is TemplateError


@functools.cache
def compile_template(source: str) -> Any:
    """``source`` compiled in the bounded sandbox (cached: a model's template is compiled once).

    Raises:
        jinja2.TemplateSyntaxError: not a template; anything else its constants do wrong.
    """
    with bounded():  # constant expressions are evaluated while compiling
        return environment().from_string(source)


def render_bounded(template: Any, **context: Any) -> str:
    """Render a compiled template within the bounds.

    Raises:
        LimitExceeded: it went past a bound in time or size.
        Exception: anything else it did wrong (``raise_exception``, ``1/0``, a missing key).
    """
    pieces: list[str] = []
    size = 0
    with bounded() as budget:
        for piece in template.generate(**context):
            budget.tick()
            size += len(piece)
            budget.fits(size, "the prompt")
            pieces.append(piece)
    return "".join(pieces)
