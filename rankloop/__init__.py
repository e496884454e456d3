"""rankloop."""
