#!/usr/bin/env python3
"""Paste measured tables into README.md between their markers (no hand-copied numbers).

    python scripts/update_readme.py

Each block ``<!-- BEGIN name -->`` ... ``<!-- END name -->`` in README.md is replaced by the file
named in ``BLOCKS`` (written by the command given there); missing files leave the block as it is.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# block name -> (file, command that writes it)
BLOCKS = {
    "demo": ("logs/demo/summary.md", "make demo"),
    "unet_uni_pc_teacher": ("samples/digits/compare/uni_pc_teacher/comparison.md",
                            "CFG=configs/digits.yml scripts/compare.sh"),
    "unet_ipndm_teacher": ("samples/digits/compare/ipndm_teacher/comparison.md",
                           "CFG=configs/digits.yml scripts/compare.sh"),
    "unet_uni_pc_digit_fd": ("samples/digits/compare/uni_pc_digit_fd/comparison.md",
                             "CFG=configs/digits.yml scripts/compare.sh"),
    "unet_ipndm_digit_fd": ("samples/digits/compare/ipndm_digit_fd/comparison.md",
                            "CFG=configs/digits.yml scripts/compare.sh"),
    "demo_flow": ("logs/demo/flow/summary.md", "make demo"),
    "flow_uni_pc_teacher": ("samples/digits_flow/compare/uni_pc_teacher/comparison.md",
                  "CFG=configs/digits_flow.yml TEACHER_SKIP=time_uniform N_DATA=200 N_TRAIN=100 scripts/compare.sh"),
    "flow_uni_pc_digit_fd": ("samples/digits_flow/compare/uni_pc_digit_fd/comparison.md",
                  "CFG=configs/digits_flow.yml TEACHER_SKIP=time_uniform N_DATA=200 N_TRAIN=100 scripts/compare.sh"),
    "flow_ipndm_teacher": ("samples/digits_flow/compare/ipndm_teacher/comparison.md",
                  "CFG=configs/digits_flow.yml TEACHER_SKIP=time_uniform N_DATA=200 N_TRAIN=100 scripts/compare.sh"),
    "flow_ipndm_digit_fd": ("samples/digits_flow/compare/ipndm_digit_fd/comparison.md",
                  "CFG=configs/digits_flow.yml TEACHER_SKIP=time_uniform N_DATA=200 N_TRAIN=100 scripts/compare.sh"),
    "gmm_uni_pc_teacher": ("samples/digits_gmm/compare/uni_pc_teacher/comparison.md", "scripts/compare.sh"),
    "gmm_ipndm_teacher": ("samples/digits_gmm/compare/ipndm_teacher/comparison.md", "scripts/compare.sh"),
    "bench": ("bench/out/bench.md", "make bench"),
    "quality_gmm": ("samples/quality_seeds/digits_gmm.md", "CFG=configs/digits_gmm.yml scripts/quality_seeds.sh"),
    "quality_unet": ("samples/quality_seeds/digits.md", "CFG=configs/digits.yml scripts/quality_seeds.sh"),
    "departures_gmm": ("samples/departures/digits_gmm.md", "scripts/departures.sh"),
}


def main() -> int:
    import argparse

    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    for name, (file, command) in BLOCKS.items():
        src = ROOT / file
        pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
        if not pattern.search(text):
            continue
        if not src.is_file():
            print(f"{file} missing (run: {command}); block {name} left as it is", file=sys.stderr)
            continue
        body = src.read_text().strip() + "\n"
        text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
        print(f"block {name} <- {file}")
    readme.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
