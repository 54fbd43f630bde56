"""Adapters: translate between the outside world (SMTP, Slack, CLI, web) and the core."""
