"""The ``jobcast`` command line: the process commands (``dev``, ``web``, ``worker``, ``keys``) and
the client commands that talk to a running server (``submit``, ``status``, ``tail``, ...).

    main            the argument parser and the process commands
    commands        the client commands, their output and exit statuses
    client          the HTTP client they talk through
    terminal        how jobs read in a terminal (colours, job card, tail's live view)
    dev             ``jobcast dev``: supervises Redis, a worker and the web server
    embedded_redis  a private redis-server process (``jobcast dev``, the test suite)
"""
