"""The one error hierarchy of Wasla; edges (DICOM status, CLI exit codes, MQTT dead letters) translate it."""
from __future__ import annotations


class WaslaError(Exception):
    """Base of every error Wasla raises on purpose. `exit_code` is what the CLI exits with."""

    exit_code = 1


class ConfigError(WaslaError):
    """The configuration file or a value in it is wrong; the message names the key."""

    exit_code = 2


class NotFoundError(WaslaError):
    """A study, instance, model or file asked for does not exist."""

    exit_code = 3


class BadInputError(WaslaError):
    """An input file cannot be accepted for triage; the message is the quarantine reason."""

    exit_code = 4


class UnsupportedTransferSyntaxError(BadInputError):
    """The pixel data is encoded with a transfer syntax no installed codec can decode."""


class NoPixelDataError(BadInputError):
    """The dataset carries no image to triage."""


class ImageTooLargeError(BadInputError):
    """The dataset claims dimensions beyond the configured safety limit."""


class ModelError(WaslaError):
    """A model package cannot be used."""

    exit_code = 5


class ModelIntegrityError(ModelError):
    """A model package failed its hash or signature check: it is refused, never loaded."""


class InferenceError(ModelError):
    """A backend failed to run a model or produced unusable output (NaN, wrong shape)."""


class StoreError(WaslaError):
    """The local SQLite store or the spool cannot do what was asked."""

    exit_code = 6


class UidCollisionError(StoreError):
    """A box sent a study or instance UID the hub already holds for another box: refused, never merged."""

    def __init__(self, kind: str, uid: str, owner: str, claimant: str):
        super().__init__(f"UID collision: {kind} {uid} belongs to another box")
        self.kind, self.uid, self.owner, self.claimant = kind, uid, owner, claimant


class OutOfResourcesError(StoreError):
    """Not enough free disk (or another resource) to accept new data safely."""


class ConflictError(StoreError):
    """Another writer held what a transaction needed (a deadlock, a lock wait past its timeout): nothing of it was
    stored, and the same writes are expected to succeed when tried again."""


class StateError(StoreError):
    """A state transition that the study state machine does not allow."""


class SyncError(WaslaError):
    """Transport or protocol failure between box and hub."""

    exit_code = 7


class ProtocolError(SyncError):
    """A message that does not follow the wire protocol (malformed, oversized, unknown version, wrong device)."""
