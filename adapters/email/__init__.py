"""Email adapter: the inbound SMTP listener, message parsing and the outbound sender."""
