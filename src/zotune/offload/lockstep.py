"""Run the +eps and the -eps forward of one step block by block, in two threads kept in lock step.

The closure stays a black box (``optimizer.step(closure)`` as always): each of the two threads
runs it once. Hooks before each model forward (the ``BOTTOM`` gate), at the entry of every decoder
block and after the last one (the ``TOP`` gate) make the thread stop and wait until the conductor
(the thread that runs the step) lets it through. So exactly one thread computes at a time, and
between two gates the conductor can upload a block, perturb it by +eps, let the ``+`` thread
through it, perturb it by -2eps, let the ``-`` thread through it, restore it and write it back:
every block is on the device once per model forward, and both hidden-state streams pass through
it while it is there.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch

BOTTOM = "bottom"  # the gate before a model forward: the embeddings follow
TOP = "top"  # the gate after the last block: the final norm, the head and the loss follow


class Aborted(BaseException):
    """Raised inside a waiting thread when the step is abandoned."""


class Lockstep:
    """Two closure threads (``"+"`` and ``"-"``) that stop at every gate until released.

    ``run(role, fn)`` starts ``fn`` in a thread; ``wait(role)`` blocks the conductor until that
    thread stands at a gate (returns the gate) or has finished (returns ``None``); ``release(role)``
    lets it run to its next gate; ``result(role)`` joins it and returns ``fn``'s value (or raises its
    exception). Threads that are waiting are unwound with :class:`Aborted` by ``abort()``.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # the closure threads issue their kernels on the conductor's stream, which orders them with the
        # perturbations and the copy events (a new thread would otherwise start on the default stream)
        self.stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
        self._cv = threading.Condition()
        self._at: dict[str, Any] = {}  # role -> gate it waits at
        self._go: dict[str, bool] = {}
        self._done: dict[str, tuple[bool, Any]] = {}  # role -> (ok, value or exception)
        self._threads: dict[str, threading.Thread] = {}
        self._aborted = False
        self._local = threading.local()

    def role(self) -> str | None:
        """The role of the calling thread, or None outside this lockstep's threads."""
        return getattr(self._local, "role", None)

    # ------------------------------------------------------------------ thread side
    def arrive(self, gate: Any) -> None:
        """Called by a closure thread at a gate: wait there until the conductor releases it."""
        role = self.role()
        if role is None:
            return
        with self._cv:
            self._at[role] = gate
            self._go[role] = False
            self._cv.notify_all()
            self._cv.wait_for(lambda: self._go[role] or self._aborted)
            if self._aborted:
                raise Aborted()

    def run(self, role: str, fn: Callable[[], Any]) -> None:
        def body() -> None:
            self._local.role = role
            try:
                with torch.no_grad():  # grad mode is per thread
                    if self.stream is not None:
                        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
                            value = fn()
                    else:
                        value = fn()
                outcome: tuple[bool, Any] = (True, value)
            except BaseException as e:  # handed to the conductor, which re-raises it
                outcome = (False, e)
            with self._cv:
                self._done[role] = outcome
                self._at.pop(role, None)
                self._cv.notify_all()

        thread = threading.Thread(target=body, name=f"zotune-offload{role}", daemon=True)
        self._threads[role] = thread
        thread.start()

    # ------------------------------------------------------------------ conductor side
    def wait(self, role: str) -> Any:
        """Block until ``role`` stands at a gate (return it) or has finished (return None)."""
        with self._cv:
            self._cv.wait_for(lambda: role in self._at or role in self._done)
            if role in self._done:
                ok, value = self._done[role]
                if not ok and not isinstance(value, Aborted):
                    raise value
                return None
            return self._at[role]

    def release(self, role: str) -> None:
        with self._cv:
            self._at.pop(role, None)
            self._go[role] = True
            self._cv.notify_all()

    def result(self, role: str) -> Any:
        self._threads[role].join()
        ok, value = self._done[role]
        if not ok:
            raise value
        return value

    def abort(self) -> None:
        """Unwind every waiting thread and join them all."""
        with self._cv:
            self._aborted = True
            self._cv.notify_all()
        for thread in self._threads.values():
            thread.join()
