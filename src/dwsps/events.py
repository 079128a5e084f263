"""Event handlers shared by the server and the client.

Handlers may be plain functions or coroutine functions. A handler that raises
is logged and never reaches the code that emitted the event.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class Events:
    """A small event emitter: ``on``, ``off``, ``emit``."""

    __slots__ = ("_handlers", "_log", "_names", "_tasks")

    def __init__(self, names: tuple[str, ...], logger: logging.Logger) -> None:
        self._names = names
        self._handlers: dict[str, list[Callable[..., Any]]] = {}
        self._log = logger
        self._tasks: set[asyncio.Task[Any]] = set()

    def on(self, event: str, handler: F | None = None) -> Any:
        """Register ``handler`` for ``event``; without a handler, return a decorator."""
        if event not in self._names:
            raise ValueError(f"unknown event {event!r}; known: {', '.join(self._names)}")
        if handler is None:

            def decorator(func: F) -> F:
                self.on(event, func)
                return func

            return decorator
        self._handlers.setdefault(event, []).append(handler)
        return handler

    def off(self, event: str, handler: Callable[..., Any]) -> None:
        """Remove a handler registered with :meth:`on` (no error if absent)."""
        handlers = self._handlers.get(event)
        if handlers and handler in handlers:
            handlers.remove(handler)
            if not handlers:
                del self._handlers[event]

    def has(self, event: str) -> bool:
        """Whether anyone listens for ``event`` (lets hot paths skip building arguments)."""
        return event in self._handlers

    def emit(self, event: str, *args: Any) -> None:
        """Call every handler of ``event``; coroutines are scheduled as tasks."""
        for handler in tuple(self._handlers.get(event, ())):
            try:
                result = handler(*args)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._task_done)
            except Exception:
                self._log.exception("%s handler %r raised", event, handler)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self._log.error("async event handler raised", exc_info=task.exception())
