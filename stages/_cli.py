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

        return wrapper

    return decorate


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
