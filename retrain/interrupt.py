"""Ctrl-C while retrain's background threads import: raised in the main thread, never inside an
import.

`retrain fit` imports scipy.optimize and onnx (0.54 s measured on 2 cores) and compiles the
OpenVINO backbone (~0.35 s) in background threads while the photos are hashed and decoded. A
KeyboardInterrupt that lands in the middle of importlib can leave Python's import lock held, and
those threads would then wait for it forever instead of letting the process end (1 hang in 68
Ctrl-Cs at stepped delays, before this). Within `ctrl_c_outside_imports()`, a SIGINT that
arrives while the main thread is inside an import is raised 20 ms later instead.
"""

from __future__ import annotations


class ctrl_c_outside_imports:  # noqa: N801 - used as a context manager, like contextlib's
    """While a command runs, Ctrl-C raises KeyboardInterrupt as usual, except inside an import:
    there it is raised 20 ms later (or when the command ends, if that is sooner). An interrupt
    in the middle of importlib can leave Python's import lock held, and retrain's background
    threads (which import and compile while the photos are hashed and decoded) would then wait
    for it forever instead of letting the process end."""

    def __enter__(self):
        import signal
        import threading

        self.old, self.deferred = None, None
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self.old = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, exc_type, *_):
        import signal

        if self.old is None:
            return
        signal.signal(signal.SIGINT, self.old)
        if self.deferred is not None:
            self.deferred.cancel()
            if exc_type is None:
                raise KeyboardInterrupt  # pressed while the command ran: say so, as ever

    def _handler(self, signum, frame):
        import os
        import threading

        self.deferred = None
        f = frame
        while f is not None:
            if f.f_code.co_filename.startswith("<frozen importlib"):
                self.deferred = threading.Timer(0.02, os.kill, (os.getpid(), signum))
                self.deferred.start()
                return
            f = f.f_back
        raise KeyboardInterrupt
