"""llama.cpp's own GGUF converters from llama-cpp-python's PyPI sdist (which vendors
llama.cpp): convert_hf_to_gguf.py, convert_lora_to_gguf.py, their conversion/ package and
gguf-py/, extracted into a folder. The one place the sdist is pinned (version and sha256):
hack/llamacpp.sh (local runs and tests) and Dockerfile.trainer (the trainer image, at
/opt/llama.cpp) both use it. Standard library only.

  python3 hack/llamacpp_converter.py OUT_DIR [--sdist PATH]   (PATH: a downloaded sdist)
  python3 hack/llamacpp_converter.py --pin                     (VERSION SHA256 URL)
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

VERSION = "0.3.36"
SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
URL = (
    "https://files.pythonhosted.org/packages/ec/e9/"
    "e7de2b0463ea3ffbf0ede6cb21b58c1258a8f6521aae45ca773a59fe7cf3/"
    f"llama_cpp_python-{VERSION}.tar.gz"
)
KEEP = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def extract(sdist: Path, out: Path) -> None:
    got = sha256(sdist)
    if got != SHA256:
        sys.exit(f"{sdist}: sha256 {got}, expected {SHA256} (llama-cpp-python {VERSION})")
    top = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    with tarfile.open(sdist) as archive:
        members = []
        for member in archive.getmembers():
            inner = member.name[len(top) :]
            if member.name.startswith(top) and inner.startswith(KEEP):
                member.name = inner
                members.append(member)
        # The safe "data" filter where this Python has it (3.11.4+; Debian 12 has 3.11.2).
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(out, members=members, **safe)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", type=Path)
    parser.add_argument("--sdist", type=Path)
    parser.add_argument("--pin", action="store_true")
    args = parser.parse_args()
    if args.pin:
        print(VERSION, SHA256, URL)
        return
    if args.out is None:
        parser.error("OUT_DIR is required")
    if args.sdist is not None:
        extract(args.sdist, args.out)
        return
    with tempfile.TemporaryDirectory() as tmp:
        sdist = Path(tmp) / URL.rsplit("/", 1)[1]
        urllib.request.urlretrieve(URL, sdist)
        extract(sdist, args.out)


if __name__ == "__main__":
    main()
