"""``python -m jobcast ...`` is ``jobcast ...``; every process Jobcast starts runs it this way."""

from jobcast.cli.main import main

main()
