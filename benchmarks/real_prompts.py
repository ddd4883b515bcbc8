"""Write a file of varied real prompts for capturing activations (``hp-fast capture --prompts``).

The pursuit benchmarks need head outputs ``z`` from real text, not random numbers: the spectrum of
each head's samples decides how tight the bounds of docs/fast-pursuit.md section 8 are. The set
mixes the package's own task prompts, deterministically (fixed seed):

* QA questions (``hp_fast.data.qa``): "In which country is the city of ...?" and capital /
  continent questions, in the QA template the evaluation uses;
* keyword-task prompts (``hp_fast.evaluation.keywords``): every object under each of the three
  concept templates (captions with colors, feelings, sizes);

then shuffled and cut to ``--n`` prompts, one per line.

    python benchmarks/real_prompts.py --n 200 --out /tmp/prompts200.txt
    hp-fast capture --prompts /tmp/prompts200.txt --out /tmp/acts200.safetensors
"""
from __future__ import annotations

import argparse
import os
import random

from hp_fast.data.qa import QA_TEMPLATE, country_questions, other_questions
from hp_fast.evaluation.keywords import OBJECTS, PROMPTS, TextItem


def real_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` distinct prompts: about 35 % city questions, 25 % capital/continent questions and
    40 % keyword-task prompts, shuffled with ``seed``."""
    rng = random.Random(seed)
    cities = [QA_TEMPLATE.format(q=q.question) for q in country_questions()]
    others = [QA_TEMPLATE.format(q=q.question) for q in other_questions()]
    keywords = [TextItem(o, template=t).prompt for t in PROMPTS.values() for o in OBJECTS]
    for pool in (cities, others, keywords):
        rng.shuffle(pool)
    n_city, n_other = round(0.35 * n), round(0.25 * n)
    picked = cities[:n_city] + others[:n_other] + keywords[:n - n_city - n_other]
    if len(picked) < n:
        raise ValueError(f"only {len(picked)} prompts available, asked for --n {n}")
    rng.shuffle(picked)
    return picked


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="a .txt file (one prompt per line)")
    args = ap.parse_args()
    lines = real_prompts(args.n, args.seed)
    tmp = args.out + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {len(lines)} prompts to {args.out}")


if __name__ == "__main__":
    main()
