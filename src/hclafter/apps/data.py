"""The dataset tools: ``data check`` (a dataset root judged without training) and ``data prepare``
(the image store decoded ahead of training)."""
from __future__ import annotations

import argparse

from ..core.config import load_config


def cmd_data_check(args: argparse.Namespace) -> int:
    from ..data import SPLITS, check_dataset, describe_problems
    from ..core.runtime import cache_dir_of

    overrides = [f"data.format={args.format}", f"data.root={args.root}", *args.overrides]
    if args.skip_invalid:
        overrides.append("data.skip_invalid=true")
    cfg = load_config(args.config, overrides)
    data, problems, dropped = check_dataset(cfg.data, cfg.seed, cache_dir_of(cfg))
    print(f"dataset: {args.root} (format {args.format})")
    if data is not None:
        width = max(len(c) for c in data.wheel.classes)
        print(f"{'class':<{width}}  " + "  ".join(f"{s:>6}" for s in SPLITS))
        for label, name in enumerate(data.wheel.classes):
            counts = [sum(s.label == label for s in data[split]) for split in SPLITS]
            print(f"{name:<{width}}  " + "  ".join(f"{n:>6}" for n in counts))
        print(f"{'total':<{width}}  " + "  ".join(f"{len(data[s]):>6}" for s in SPLITS))
    if dropped:
        print(f"\n{len(dropped)} image(s) left out by the dataset's protocol:\n" + describe_problems(dropped, args.limit))
    if problems:
        print(f"\n{describe_problems(problems, args.limit)}")
    absent = {} if data is None else data.absent_classes()
    if absent:
        print("\nclasses without images (left out of that split's macro-F1):\n" +
              "\n".join(f"  {split}: {', '.join(classes)}" for split, classes in absent.items()))
    empty = [] if data is None else [s for s in SPLITS if not data[s]]
    fails = data is None or bool(empty) or (bool(problems) and not cfg.data.skip_invalid)
    if empty:
        print(f"\nempty split(s): {empty}")
    if fails:
        print("\ntraining would fail: fix the problems above" +
              ("" if not problems or cfg.data.skip_invalid else ", or skip them with data.skip_invalid=true"))
        return 1
    print("\nok: training can start" + (f" ({len(problems)} bad input(s) will be skipped)" if problems else ""))
    return 0


def cmd_data_prepare(args: argparse.Namespace) -> int:
    from ..engine.inputs import prepare_stores

    for line in prepare_stores(load_config(args.config, args.overrides), progress=not args.quiet):
        print(line)
    return 0
