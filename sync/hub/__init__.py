"""The hub: receiver, its index and files, its CLI and config; it never imports the box."""
