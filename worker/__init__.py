"""Jobcast's job domain: job types, the store and state machine, the arq worker."""
