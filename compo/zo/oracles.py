"""Stage 2's oracles, built and checked before any work: a bad name, option or key, or an
oracle the chosen estimator or vocabulary support cannot serve, fails at start-up (exit 2)."""

from __future__ import annotations

from compo.core.config import RunConfig, ZOConfig
from compo.core.errors import UserError
from oracles.base import Evidence, Oracle, build_oracle
from oracles.options import OptionError


def check_estimator(cfg: ZOConfig, oracle: Oracle) -> None:
    """The projected estimator and a vocabulary support are exact only for oracles that vote on
    fixed pairs' log-probs (a judge's candidates generate text over the whole vocabulary)."""
    if cfg.estimator == "projected" and oracle.needs != Evidence.LOGPROBS:
        raise UserError("zo.estimator", "zo.estimator=projected is exact only for likelihood oracles on fixed "
                        f"pairs; oracle '{oracle.name}' judges generated text: use zo.estimator=full")
    if cfg.support != "all" and oracle.needs != Evidence.LOGPROBS:
        raise UserError("zo.support", f"zo.support={cfg.support} needs an oracle that votes on fixed pairs' "
                        f"log-probs; oracle '{oracle.name}' judges generated text, which candidates may write "
                        "with any token: use zo.support=all (docs/zo_support.md)")


def build_oracles(cfg: RunConfig) -> tuple:
    """Construct stage 2's oracles now (a bad name, option or missing key fails before any work)."""
    built = []
    for key, spec in (("zo.oracle", cfg.zo.oracle), ("zo.accept_oracle", cfg.zo.accept_oracle)):
        if spec is None:
            built.append(None)
            continue
        try:
            built.append(build_oracle(spec.name, **spec.options))
        except OptionError as e:
            raise UserError(f"{key}.options.{e.key}" if e.key else f"{key}.options", e.what) from None
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - the constructor's own check (ValueError, JudgeError, ...)
            raise UserError(key, f"cannot build oracle '{spec.name}': {e}") from None
    try:
        check_estimator(cfg.zo, built[0])
    except UserError:
        built[0].close()
        raise
    return tuple(built)
