"""The ``attnfuse`` command: ``attnfuse demo``, ``attnfuse bench``, ``attnfuse fusions``."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = (
        "usage: attnfuse {demo,bench,fusions} [...]\n"
        "  demo     run a small model eager and patched; print the fusion report\n"
        "  bench    run the GPU benchmark suites, write results under benchmarks/results/\n"
        "  fusions  list the built-in fusions in run order"
    )
    if not argv or argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if cmd == "bench":
        from .bench import main as bench_main

        return bench_main(rest)
    if cmd == "fusions":
        from .fusions import BUILTIN_FUSIONS

        for name in BUILTIN_FUSIONS:
            print(name)
        return 0
    print(f"attnfuse: unknown command {cmd!r}\n{usage}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
