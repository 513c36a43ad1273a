"""Serving-side code (vLLM environment): long-lived engine sessions, the replica dispatcher and the paired
speed method. Imports only the domain facts, the base modules and this package."""
