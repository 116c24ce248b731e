"""What box and hub share and nothing else: errors, config mechanism, i18n, service plumbing, disk and liveness."""
