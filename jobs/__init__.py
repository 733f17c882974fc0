"""The ``zsl`` command line: thin user commands (config + logging + one stage call); see :mod:`jobs.cli`."""
