"""Fleet provisioning: CA, per-box identities and bundles, broker TLS/ACL/CRL, model signing, pseudonyms."""
