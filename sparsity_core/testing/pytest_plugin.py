"""pytest plugin of the conformance kit (registered under the pytest11 entry point)."""
