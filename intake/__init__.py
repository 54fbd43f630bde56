"""intake core: channel-neutral messages, tickets, rules and policy. No I/O."""
