"""download_file: a failed transfer says what failed, the URL, and where to place the file by hand."""
import os
import socket

import pytest

from paddlefsl.datasets import DownloadError, download_file


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]          # nothing listens there once the socket is closed


@pytest.mark.parametrize("kind", ["refused", "missing file"])
def test_failed_transfer_names_the_url_the_file_and_the_way_by_hand(tmp_path, kind):
    url = f"http://127.0.0.1:{_closed_port()}/omniglot/x.zip" if kind == "refused" \
        else (tmp_path / "server" / "x.zip").as_uri()
    dest = tmp_path / "data" / "x.zip"
    with pytest.raises(DownloadError) as info:
        download_file(url, str(dest), progress=False, timeout=5)
    message = str(info.value)
    assert url in message and str(dest) in message and "by hand" in message and "offline" in message
    assert isinstance(info.value, OSError)          # callers catching OSError keep working
    assert os.listdir(tmp_path / "data") == []      # no partial file left behind
