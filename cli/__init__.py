"""Click command-line interface, installed as ``mdnumba.cli`` (console script ``mdnumba``)."""
