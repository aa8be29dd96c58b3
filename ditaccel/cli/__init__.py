"""Command line: ``ditaccel --help``, ``ditaccel info``, ``ditaccel bench``."""
