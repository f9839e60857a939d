"""What every recipe shares: compose the repository's conf/ (train.py's config and schema) with
the recipe's overrides, then its --smoke overrides, then the command line's (a later override
of the same key wins), and run the result on train.py's path (`macfleet.run`). A recipe is its
list of overrides and any code of its own; a forked recipe copies this file along with it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Callable

CONF = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str]):
    """train.py's config from conf/ (conf/local/ included) with `overrides`, as Hydra composes it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from macfleet.config import register_configs

    register_configs()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def recipe_config(recipe: list[str], smoke: Callable[[str], list[str]] | None, argv: list[str], tmp: str):
    """The recipe's config: `recipe`, then `smoke(tmp)` (offline, a few steps, written under
    `tmp`) when given, then `argv`."""
    overrides = list(recipe)
    if smoke is not None:
        # Smoke output is read by scripts and tests: log lines, no progress bar.
        overrides += [*smoke(tmp), "trainer.progress=false", f"trainer.output_dir={tmp}/run"]
    return compose(overrides + list(argv))


def main(recipe: list[str], smoke: Callable[[str], list[str]], argv: list[str], doc: str) -> int:
    """Run the recipe with the command line's overrides; print `RESULT {json}` (this process's
    metrics) as the last stdout line, for scripts and tests. Returns the exit status: 1 with a
    one-line message for errors the user can fix."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from macfleet import MacFleetError
    from macfleet.run import fit

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="offline, tiny data and model, a few steps")
    parser.add_argument("overrides", nargs="*", help="train.py's overrides, e.g. cluster=pro_air cluster.role=master")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s] %(message)s")
    with tempfile.TemporaryDirectory(prefix="macfleet-recipe-") as tmp:
        try:
            cfg = recipe_config(recipe, smoke if args.smoke else None, args.overrides, tmp)
            metrics = fit(cfg)
        except (MacFleetError, HydraException, OmegaConfBaseException) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    keep = {k: v for k, v in metrics.items() if isinstance(v, (int, float, str, bool))}
    print("RESULT " + json.dumps(keep, sort_keys=True), flush=True)
    return 0
