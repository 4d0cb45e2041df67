"""Generate the Python modules of the ingestd.v1 API from protos/.

Run from anywhere: ``python scripts/generate_protos.py``. The output goes to
``ingestd/v1/`` by default, so the modules import each other as
``ingestd.v1.*`` with no path edits. ``--out DIR`` writes elsewhere, which the
test suite uses to check that the committed modules are up to date.
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "protos"


def generate(out_dir: Path) -> list[Path]:
    """Run protoc on every .proto file and return the files it wrote."""
    protos = sorted(PROTO_ROOT.glob("ingestd/v1/*.proto"))
    well_known = resources.files("grpc_tools") / "_proto"
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        f"--mypy_out={out_dir}",
        f"--mypy_grpc_out={out_dir}",
        *(str(path) for path in protos),
    ]
    status = protoc.main(args)
    if status != 0:
        raise SystemExit(f"protoc failed with exit status {status}")
    package = out_dir / "ingestd" / "v1"
    (package / "__init__.py").write_text('"""Generated ingestd.v1 API."""\n')
    return sorted(package.iterdir())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT, help="output root folder")
    options = parser.parse_args()
    for path in generate(options.out):
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
