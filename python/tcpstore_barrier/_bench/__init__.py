"""The pieces of ``python -m tcpstore_barrier bench``, one concern a module.

- ``config``: the command line, parsed into a :class:`~.config.BenchConfig`.
- ``argtypes``: the option types and help layout every bench command shares.
- ``schedule``: which blocks of barriers run in which order (A/B rounds).
- ``rank``: what one rank does; runs inside the rank processes or threads.
- ``launch``: starting the ranks, collecting their figures, killing leftovers.
- ``stats``: medians, percentiles and the per-world-size summary.
- ``report``: the table, the JSON document and the plot.
- ``progress``: the progress line on stderr.
- ``memory``: ``bench-memory``, memory per barrier object and of the store
  over many barriers; its pieces are the ``memory_*`` modules.
- ``importtime``: ``bench-import``, the import time of the package.

Everything but ``rank``, ``launch`` and the process halves of the ``memory`` modules is
pure and needs no store.
"""
