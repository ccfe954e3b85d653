"""Test-only code of ft (fault injection); production code imports it only when asked to."""
