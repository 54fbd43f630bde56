"""Slack: Events API (HTTP or Socket Mode) in, chat.postMessage out.

:class:`~adapters.slack.listener.SlackListener` turns channel messages into InboundMessages for
the service; :class:`~adapters.slack.sender.SlackChatSender` posts the outbox's chat notes.
"""

from adapters.slack.listener import SlackListener
from adapters.slack.sender import SlackChatSender

__all__ = ["SlackChatSender", "SlackListener"]
