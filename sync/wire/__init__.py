"""The wire: what box and hub must agree on (messages, codecs, the bounded reader of untrusted DICOM)."""
