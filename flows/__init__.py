"""Flows: deployable Prefect jobs that compose tasks; the CLI lives here too."""
