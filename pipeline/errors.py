"""Exception classes shared by the library; entry points turn any ``Yt8mError`` into one line on stderr.

Errors about one bad input record carry a machine-readable ``reason`` so that a pipeline can dead-letter the
record, count it per reason and keep going, while a human still gets a sentence in ``message``.
"""
from __future__ import annotations

RECORD_REASONS = (
    "unparsable",
    "legacy_2017_format",
    "missing_feature",
    "bad_frame_length",
    "frame_count_mismatch",
    "zero_frames",
    "label_out_of_range",
    "segment_length_mismatch",
)

FRAMING_REASONS = ("bad_length_crc", "bad_data_crc", "truncated")


class Yt8mError(Exception):
    """Base class of every error this project raises on purpose (bad input, bad configuration)."""


class RecordError(Yt8mError):
    """One serialized YouTube-8M record cannot be turned into a ``VideoRecord``.

    Args:
        reason: one of ``RECORD_REASONS``; stable, meant for counting and dead-letter files.
        message: what is wrong, for a human.
        video_id: the record's id when it could be read before the problem was found.
    """

    def __init__(self, reason: str, message: str, video_id: str | None = None):
        if reason not in RECORD_REASONS:
            raise ValueError(f"unknown RecordError reason {reason!r}; expected one of {RECORD_REASONS}")
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message
        self.video_id = video_id

    def __reduce__(self):
        # Beam moves exceptions between worker processes; the default pickling would call cls(str(self)).
        return (type(self), (self.reason, self.message, self.video_id))


class TFRecordCorruption(Yt8mError):
    """The TFRecord framing of a file is broken at byte ``offset`` (start of the damaged record).

    Args:
        reason: one of ``FRAMING_REASONS``.
        offset: byte offset of the record header where the damage was found.
        message: what is wrong, for a human.
        source: file name or URL, when the reader knows it.
    """

    def __init__(self, reason: str, offset: int, message: str, source: str = ""):
        if reason not in FRAMING_REASONS:
            raise ValueError(f"unknown TFRecordCorruption reason {reason!r}; expected one of {FRAMING_REASONS}")
        where = f"{source} at byte {offset}" if source else f"at byte {offset}"
        super().__init__(f"{reason} {where}: {message}")
        self.reason = reason
        self.offset = int(offset)
        self.message = message
        self.source = source

    def __reduce__(self):
        return (type(self), (self.reason, self.offset, self.message, self.source))
