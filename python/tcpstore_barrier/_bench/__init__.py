"""The bench commands' pieces: ``cli`` options, ``launch`` processes, ``rank``
the work of one rank, ``results`` summaries, ``memory`` and ``importtime``."""
