"""The verbs of the `tnt` command line, one module each."""
