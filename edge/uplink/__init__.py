"""The box side of sync: outbox, uploader and bandwidth budget (box store + wire, never the hub)."""
