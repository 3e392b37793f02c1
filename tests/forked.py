"""Run ``cli.main`` in a forked child of the test process: a real separate process (it can die by
SIGKILL) without the interpreter and import start-up of a fresh ``quant``."""
from __future__ import annotations

import logging
import os
import sys
import traceback

from blockquant.frame import cli


def run_child(argv: list[str], log_path: str, fault: str | None = None) -> int:
    """``cli.main(argv)`` in a forked child; its exit code, or -SIGNAL when a signal ended it."""
    pid = os.fork()
    if pid == 0:   # the child: never returns into pytest
        code = 70
        try:
            sys.stderr = open(log_path, "w", buffering=1)   # pytest's capture is not this process's
            sys.stdout = open(os.devnull, "w")
            if fault:
                os.environ["BLOCKQUANT_FAULT"] = fault
            logger = logging.getLogger("blockquant")
            for h in [h for h in logger.handlers if getattr(h, "_blockquant", False)]:
                logger.removeHandler(h)
            code = cli.main(argv)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
