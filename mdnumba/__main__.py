"""``python -m mdnumba`` runs the command-line interface."""

from mdnumba.cli.main import main

if __name__ == "__main__":
    main()
