"""What a run prints: kardia_jax's own messages, warnings once, and where a job's outputs are.

Every entry point's `main` starts with `setup(config.distributed)`. By default (no `--verbosity` /
`-v` on the command line) the console then shows

    kardia_jax's own INFO lines        on process 0 only
    WARNING and above                  from every library, each warning once (a library's once per line
                                       of its source, kardia_jax's once per text), on every process
    the progress bar and summary lines `metrics.MetricsLogger.progress`, process 0

and hides the INFO lines of libraries (Orbax writes dozens per checkpoint; absl, jax, grain, optax).
An explicit `--verbosity=N` (absl's flag: -1 warning, 0 info, 1 debug) restores absl's own behaviour,
libraries included, on every process: `python -m kardia_jax.train -v 1`.

How absl and `logging` interact: orbax, optax and grain log through `absl.logging`, i.e. the Python
logger "absl"; jax through loggers named "jax.*". All of them propagate to the root logger, where
`absl.app` installs its handler and sets the root level from `--verbosity` (an unset flag becomes 0,
INFO, once flags are parsed). So the level alone cannot tell ours from theirs: a filter on that
handler does, by the source file of each record.

`print_outputs(job, paths)` prints, on process 0, where a finished job left its files.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping

import jax
from absl import flags
from absl import logging as absl_logging

from kardia_jax import sharding

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class ConsoleFilter(logging.Filter):
    """Passes WARNING and above (each warning once) and, when `primary`, kardia_jax's INFO records."""

    def __init__(self, primary: bool = True):
        super().__init__()
        self.primary = primary
        self._warned: set[tuple] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        ours = os.path.abspath(record.pathname).startswith(_PACKAGE_DIR)
        if record.levelno >= logging.ERROR:
            return True
        if record.levelno >= logging.WARNING:
            # Libraries repeat a warning with new numbers (a step, a size): once per line of their source.
            key = (record.pathname, record.lineno, record.getMessage() if ours else None)
            if key in self._warned:
                return False
            self._warned.add(key)
            return True
        return self.primary and ours


def configure_logging(verbosity: int | None = None, *, primary: bool = True,
                      handler: logging.Handler | None = None) -> None:
    """Sets up `handler` (default: absl's, which `absl.app` puts on the root logger).

    verbosity None: INFO level, filtered by `ConsoleFilter(primary)` (libraries' INFO hidden, warnings
    once, our INFO only where `primary`). An int: absl's `set_verbosity(verbosity)`, unfiltered.
    Calling it again replaces the previous setting.
    """
    handler = handler or absl_logging.get_absl_handler()
    for old in [f for f in handler.filters if isinstance(f, ConsoleFilter)]:
        handler.removeFilter(old)
    absl_logging.set_verbosity(absl_logging.INFO if verbosity is None else verbosity)
    if verbosity is None:
        handler.addFilter(ConsoleFilter(primary))


def setup(distributed: bool) -> None:
    """The first call of an entry point's `main`: the console as `--verbosity` says (module docstring),
    then `sharding.initialize_distributed(distributed)`; then only process 0 shows INFO lines. (The
    process index is known only once JAX's runtime is joined, and asking for it earlier would start it.)"""
    flag = flags.FLAGS["verbosity"]
    verbosity = flag.value if flag.present else None
    if verbosity is None and not flags.FLAGS["showprefixforinfo"].present:
        flags.FLAGS.showprefixforinfo = False  # our INFO lines without absl's "I1201 12:00:00.1 123 file:4]"
    configure_logging(verbosity)
    sharding.initialize_distributed(distributed)
    if verbosity is None:
        configure_logging(primary=jax.process_index() == 0)


def output_lines(job: str, paths: Mapping[str, str | None]) -> list[str]:
    """The lines naming where `job`'s outputs are: one per (what, path), None entries left out."""
    shown = {what: path for what, path in paths.items() if path}
    width = max(map(len, shown), default=0)
    return [f"{job} outputs:"] + [f"  {what:<{width}}  {path}" for what, path in shown.items()]


def print_outputs(job: str, paths: Mapping[str, str | None]) -> None:
    """Prints `output_lines(job, paths)` on process 0 (paths as given: local or gs://)."""
    if jax.process_index() == 0:
        print("\n".join(output_lines(job, paths)), flush=True)
