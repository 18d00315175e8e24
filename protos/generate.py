"""Generate the Python stubs of protos/gemma3serve/v1/*.proto into the gemma3serve package.

    python protos/generate.py            # regenerate in place (commit the result)
    python protos/generate.py --check    # exit 1 if the committed stubs are stale

The stubs are committed so that the installed package imports them without a build step; the test
suite runs --check, so a .proto edited without regenerating fails CI.
"""

from __future__ import annotations

import filecmp
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
PACKAGE = Path("gemma3serve") / "v1"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    (out / PACKAGE).mkdir(parents=True, exist_ok=True)
    sources = sorted(str(p.relative_to(PROTOS)) for p in (PROTOS / PACKAGE).glob("*.proto"))
    args = ["protoc", f"-I{PROTOS}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}", *sources]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    (out / PACKAGE / "__init__.py").write_text('"""Generated gRPC stubs of protos/gemma3serve/v1 (do not edit)."""\n')
    (out / "gemma3serve" / "__init__.py").write_text('"""Versioned gRPC APIs of the Gemma 3 services."""\n')
    return sorted(p.relative_to(out) for p in (out / "gemma3serve").rglob("*") if p.is_file())


def main() -> int:
    if "--check" not in sys.argv:
        for f in generate(ROOT):
            print(f"wrote {f}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        stale = [str(f) for f in generate(Path(tmp))
                 if not (ROOT / f).exists() or not filecmp.cmp(Path(tmp) / f, ROOT / f, shallow=False)]
    if stale:
        print("stale generated stubs (run python protos/generate.py):\n  " + "\n  ".join(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
