"""The pieces of ``python -m tcpstore_barrier bench``, one concern a module.

- ``config``: the command line, parsed into a :class:`~.config.BenchConfig`.
- ``schedule``: which blocks of barriers run in which order (A/B rounds).
- ``rank``: what one rank does; runs inside the rank processes or threads.
- ``launch``: starting the ranks, collecting their figures, killing leftovers.
- ``stats``: medians, percentiles and the per-world-size summary.
- ``report``: the table, the JSON document and the plot.
- ``progress``: the progress line on stderr.

Everything but ``rank`` and ``launch`` is pure and needs no store.
"""
