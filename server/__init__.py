"""Jobcast's HTTP edge: routes, authentication, limits, the event hub, the CLI."""
