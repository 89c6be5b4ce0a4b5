"""The dashboard: plain HTML, CSS and JavaScript, no build step.

This file makes the folder the package ``jobcast.static``, so that the files install with Jobcast
and are found through the import system wherever it is installed (``jobcast.dashboard`` serves them).
"""
