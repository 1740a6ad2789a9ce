"""The verbs of the ``tokenformer`` command line, one module each (the table is in :mod:`tokenformer.cli`)."""
