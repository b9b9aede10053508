"""Write torch_adamp_reproduce/data/kjv_genesis_exodus.txt.gz: the corpus of ``torch-adamp reproduce language``.

Needs Debian's ``bible-kjv`` and ``bible-kjv-text`` (``apt-get install bible-kjv``): the
King James Version, whose text is in the public domain (see KJV_LICENSE.txt). One verse
per line, verse numbers and chapter headings removed; Genesis then Exodus. The output is
deterministic (gzip without a timestamp).
"""

from __future__ import annotations

import gzip
import re
import subprocess
import sys
from pathlib import Path

BOOKS = {"Genesis": "gen1:1-50:26", "Exodus": "exo1:1-40:38"}
OUT = Path(__file__).resolve().parents[1] / "src" / "torch_adamp_reproduce" / "data" / "kjv_genesis_exodus.txt.gz"


def verses(spec: str) -> list[str]:
    text = subprocess.run(["bible", "-l100000", spec], check=True, capture_output=True, text=True).stdout
    out = []
    for line in text.splitlines():
        m = re.match(r"^\s+\d+ (.*\S)\s*$", line)
        if m:
            out.append(m.group(1))
    return out


def main() -> int:
    lines = []
    for book, spec in BOOKS.items():
        v = verses(spec)
        print(f"{book}: {len(v)} verses", file=sys.stderr)
        lines.append(f"# {book}")
        lines += v
    data = ("\n".join(lines) + "\n").encode("ascii")
    with open(OUT, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as f:
        f.write(data)
    print(f"wrote {OUT} ({OUT.stat().st_size} bytes, {len(data)} characters)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
