"""Fetching raw datasets for the prepare scripts (a local file is always accepted instead)."""

from pathlib import Path
from typing import Union

from lit_aligner.data.formats import DataError

ALPACA_URL = "https://raw.githubusercontent.com/tatsu-lab/stanford_alpaca/main/alpaca_data.json"


def download(url: str, dest: Union[str, Path], timeout: float = 60.0) -> Path:
    """Download url to dest (kept: an existing dest is reused). DataError naming the url when offline."""
    import urllib.error
    import urllib.request

    dest = Path(dest)
    if dest.is_file() and dest.stat().st_size > 0:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot download {url} ({getattr(e, 'reason', e)}); without network, download it "
                        f"elsewhere and pass the file with --data-file (e.g. ../shared/data/alpaca/alpaca_4500.json)."
                        ) from None
    tmp.replace(dest)
    return dest
