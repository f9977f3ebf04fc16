"""Dataset errors with actionable messages."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset file is missing; the message names the file, where it was expected and how to get it."""


class CorruptDatasetError(RuntimeError):
    """A dataset file exists but cannot be read or fails its checksum."""


class DownloadError(OSError):
    """A dataset file could not be downloaded; the message names the URL, the file and how to place it by hand."""
