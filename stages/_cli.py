"""Plumbing shared by every stage: logging, timing and one-line errors."""
from __future__ import annotations

import functools
import logging
import sys
import time
from contextlib import contextmanager

import click

from mom.errors import InputError

log = logging.getLogger("mom")


def stage_command(name: str):
    """Wrap a stage's click callback: configure logging, time the run, and turn
    :class:`InputError` into one line on stderr with exit status 2."""

    def decorate(function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            logging.basicConfig(
                level=logging.INFO,
                format=f"%(asctime)s {name}: %(message)s",
                datefmt="%H:%M:%S",
                stream=sys.stderr,
            )
            start = time.perf_counter()
            try:
                result = function(*args, **kwargs)
            except InputError as error:
                click.echo(f"{name}: error: {error}", err=True)
                sys.exit(2)
            log.info("finished in %.1f s", time.perf_counter() - start)
            return result

        wrapper.stage_name = name
        return wrapper

    return decorate


class StageCommand(click.Command):
    """A click command whose option errors (wrong type, unknown choice, unknown
    option) are one line on stderr, ``name: error: ...``, exit status 2, like
    an :class:`InputError` (click's default prints usage and a hint: three
    lines). Use as ``@click.command(cls=StageCommand)`` above the options."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            self._check_flags_have_no_value(list(args))
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as error:
            name = getattr(self.callback, "stage_name", self.name)
            message = " ".join(error.format_message().split())
            click.echo(f"{name}: error: {message}", err=True)
            sys.exit(2)

    def _check_flags_have_no_value(self, args: list[str]) -> None:
        """DVC renders a non-boolean value of a boolean param as ``--flag VALUE``;
        click would only say "unexpected extra argument": name the flag instead."""
        flags = {opt: param for param in self.params if getattr(param, "is_flag", False)
                 for opt in (*param.opts, *param.secondary_opts)}
        for token, following in zip(args, args[1:]):
            if token in flags and not following.startswith("-"):
                param = flags[token]
                raise click.UsageError(f"{param.opts[0]}: a true/false param, given as {param.opts[0]} or "
                                       f"{(param.secondary_opts or ['(absent)'])[0]}; got the value {following!r}")


@contextmanager
def timed(what: str):
    """Log ``what`` with the time it took."""
    start = time.perf_counter()
    yield
    log.info("%s in %.1f s", what, time.perf_counter() - start)


def require(condition: bool, message: str) -> None:
    """Raise an :class:`InputError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise InputError(message)


class AutoInt(click.ParamType):
    """An integer, or ``auto``: the stage resolves it from the collection's size
    (:mod:`mom.autosize`)."""

    name = "integer|auto"

    def convert(self, value, param, ctx):
        if isinstance(value, int) or (isinstance(value, str) and value.strip().lower() == "auto"):
            return value if isinstance(value, int) else "auto"
        try:
            return int(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not an integer or auto", param, ctx)


AUTO_INT = AutoInt()


def log_auto(sizes: dict) -> None:
    """Log every size an ``auto`` param resolved to (:mod:`mom.autosize`)."""
    for name, chosen in sizes.items():
        measured = [f"{key} = {chosen[key]}" for key in ("n", "median_side") if key in chosen]
        log.info("%s=auto -> %s (%s%s)", name, chosen["value"], chosen["rule"],
                 f"; here {', '.join(measured)}" if measured else "")
