"""The error hierarchy. Every error a user can cause is a QwenMergeError with a one-line message.

Messages follow one shape: where (file, tensor), what was expected, what was found, and a hint.
"""

from __future__ import annotations


class QwenMergeError(Exception):
    """Base class of every error qwen_merge raises on bad input or a bad destination."""


class FormatError(QwenMergeError):
    """A base or adapter file is not a valid safetensors file, index or JSON document."""


class AdapterError(QwenMergeError):
    """The adapter is of a kind or configuration this version cannot merge correctly."""


class MismatchError(QwenMergeError):
    """The adapter does not fit the base: a key lands nowhere, or shapes or ranks disagree."""


class OutputError(QwenMergeError):
    """The destination cannot be used, or writing it failed."""


class DiskFullError(OutputError):
    """The output filesystem ran out of space; the message says how much was needed and free."""


class OptionError(QwenMergeError):
    """An option has a value this version does not accept (a rounding mode, a block size, a --map).

    `option` is the keyword argument the error is about, when it is about one: the message starts with
    it (`max_shard_size: ...`), and the command line shows the flag instead (`named("--max-shard-size")`)."""

    def __init__(self, message: str, *, option: str | None = None) -> None:
        super().__init__(f"{option}: {message}" if option else message)
        self.option = option
        self.detail = message

    def named(self, name: str) -> str:
        """The message, with the option called `name` instead of its keyword."""
        return f"{name}: {self.detail}" if self.option else str(self)


class NonFiniteError(MismatchError):
    """An adapter tensor holds NaN or Inf, or the merge overflows the stored dtype (fp16)."""


class ZeroNormError(MismatchError):
    """DoRA's norm ‖W + ΔW‖ of a row or column is zero, so the merged weight would be NaN."""


class AlreadyMergedError(MismatchError):
    """The base's manifest shows this adapter was merged into it already; merging again applies it twice."""


class HubError(QwenMergeError):
    """A Hugging Face Hub input cannot be used: no such repo, revision or file, gated, only `.bin` weights."""


class DownloadError(HubError):
    """Reaching the Hub or downloading from it failed (or offline mode without the file in the cache).
    A merge stopped by it keeps its completed shards: the same command with `--resume` continues."""

    def __init__(self, message: str, *, reason: str = "") -> None:
        super().__init__(message)
        self.reason = reason


class UploadError(DownloadError):
    """Uploading to the Hub failed (the connection dropped, or the server refused an upload or the commit).
    Nothing was committed: the repo is as it was. The shards already uploaded are recorded, so the same
    command with `--resume` sends only the missing ones, then commits."""
