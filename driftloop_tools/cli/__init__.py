"""The ``driftloop`` command line, one module per command group."""
