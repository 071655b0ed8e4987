"""The pieces of the bench commands, one concern a module.

- ``cli``: the ``bench`` command line, parsed into a ``BenchConfig``; the
  option types every command shares.
- ``launch``: the one way every command starts its processes, collects
  their figures, writes its JSON and exits.
- ``rank``: what one rank of ``bench`` does, in the rank processes or threads.
- ``results``: the schedule, and from the ranks' figures to the summaries,
  the tables, the JSON document and the plot.
- ``memory``: ``bench-memory``; ``importtime``: ``bench-import``.
"""
