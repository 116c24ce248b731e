"""Wasla wire: protocol, codecs, box uploader, hub receiver."""
