"""Which kernels of a .cu file two commits compile to the same PTX: a refactor shown not to change
the code a GPU already tested, where no GPU is at hand (needs nvcc only).

    python3 scripts/ptx_same.py 0b22cd6 HEAD csrc/low_latency.cu [--only combine]

Both commits' csrc/ are compiled for sm_90 as the CI's compile test does; each kernel's PTX is
compared after normalising what a rename alone changes: the per-file hash in internal symbol names,
string-constant numbering, and template arguments of the functions owning shared variables
(``--owner-args REGEX``: e.g. a new template parameter). Prints SAME or DIFF (line count) per kernel.
"""
from __future__ import annotations

import argparse
import difflib
import os
import re
import subprocess
import tarfile
import tempfile
from io import BytesIO

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CCCL = "/usr/local/cuda/include/cccl"


def _ptx(commit: str, source: str, work: str) -> str:
    tree = os.path.join(work, commit.replace("/", "_"))
    archive = subprocess.run(["git", "archive", commit, "csrc"], cwd=ROOT, check=True, capture_output=True).stdout
    tarfile.open(fileobj=BytesIO(archive)).extractall(tree)
    out = os.path.join(tree, "out.ptx")
    cccl = os.environ.get("CUDA_HOME", "/usr/local/cuda") + "/include/cccl"
    subprocess.run(["nvcc", "-std=c++17", "-O3", "--expt-relaxed-constexpr", "-arch=sm_90", "-w", "-I",
                    os.path.join(tree, "csrc"), "-I", cccl if os.path.isdir(cccl) else CCCL, "-ptx",
                    os.path.join(tree, source), "-o", out], check=True)
    return open(out).read()


SHARED = "$shared"  # the key under which kernels() keeps every shared-variable declaration


def kernels(ptx: str, owner_args: str, drop: str = "") -> dict[str, str]:
    """{kernel symbol: its PTX}, normalised so that renames alone compare equal. Shared-variable
    declarations (which nvcc places inside a kernel or at file scope as it sees fit) are taken out of
    the kernels and kept, sorted, under SHARED. The size of a kernel's parameter block is ignored (a
    field appended to an args struct leaves every other offset, hence the code, as it was); ``drop``
    (a regex) is deleted from the text, e.g. a template argument only the new commit has."""
    ptx = re.sub(r"_(INTERNAL|GLOBAL__N_)_[0-9a-f]{8}_", r"_\1_X_", ptx)
    ptx = re.sub(r"(_param_\d+)\[\d+\]", r"\1[N]", ptx)
    if drop:
        ptx = re.sub(drop, "", ptx)
    ptx = re.sub(r"\$str\$\d+|\$str\b", "$str", ptx)
    if owner_args:
        ptx = re.sub(owner_args, "ARGS", ptx)
    lines = [line for line in ptx.splitlines() if line.strip() and line.strip() != "// demoted variable"]
    found = {SHARED: "\n".join(sorted(line.strip() for line in lines if line.lstrip().startswith(".shared")))}
    code = "\n".join(line for line in lines if not line.lstrip().startswith(".shared"))
    for part in re.split(r"\n(?=\.(?:visible )?\.?entry )", code):
        match = re.match(r"\.(?:visible )?\.?entry (\S+?)\(", part)
        if match:
            found[match.group(1)] = part
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("source", help="a .cu file under the repository root, e.g. csrc/low_latency.cu")
    parser.add_argument("--only", default="", help="only kernels whose symbol contains this")
    parser.add_argument("--owner-args", default=r"(?<=combine_send)I[A-Za-z0-9_]*?ELb",
                        help="regex for template arguments to ignore in shared-variable owners")
    parser.add_argument("--new-drop", default="",
                        help="regex deleted from the new commit's PTX only, e.g. a template argument it added: "
                             "'(?<=dispatch_recvILb[01]E)Lb0E' (kernel symbols keep their new names)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        old = kernels(_ptx(args.old, args.source, work), args.owner_args)
        new = kernels(_ptx(args.new, args.source, work), args.owner_args, args.new_drop)
    for name in sorted(new):
        if args.only not in name and name != SHARED:
            continue
        if name not in old:
            print(f"NEW   {name}")
            continue
        diff = [l for l in difflib.unified_diff(old[name].splitlines(), new[name].splitlines(), lineterm="", n=0)
                if l[:1] in "+-" and not l.startswith(("+++", "---"))]
        print(f"{'SAME' if not diff else f'DIFF ({len(diff)} lines)':<16}{name}")
        if name == SHARED:  # a kernel instantiated anew declares its own: show them
            for line in diff[:8]:
                print(f"{'':<16}{line[:160]}")


if __name__ == "__main__":
    main()
