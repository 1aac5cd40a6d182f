"""The conformance kit for plugin authors (in progress)."""
