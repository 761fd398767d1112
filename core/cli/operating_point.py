"""``lesionlab operating-point --checkpoint CKPT --data DIR`` (``python -m core.cli.operating_point``): the
referral thresholds (melanoma, malignant) chosen on validation written into the model file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from core.evaluation.evaluate import USER_ERRORS
from core.evaluation.operating_point import choose_operating_point
from core.inference.predictor import USE_TTA_BY_DEFAULT
from core.metrics.classification import REFERRAL_RULES


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lesionlab operating-point",
        description=__doc__.split("\n\n")[0],
        epilog="Exit status 2 when the model file or the data cannot be used.",
    )
    parser.add_argument("--checkpoint", required=True, type=Path, help="a model file (checkpoint or ensemble)")
    parser.add_argument("--data", required=True, type=Path, help="the HAM10000 folder the model was trained on")
    rules = {rule.key: rule for rule in REFERRAL_RULES}
    parser.add_argument(
        "--rule",
        action="append",
        choices=list(rules),
        help="the rule to choose (repeat for several; default: "
        + ", ".join(f"{r.key} for sensitivity {r.sensitivity:.2f}" for r in REFERRAL_RULES)
        + ")",
    )
    parser.add_argument(
        "--sensitivity",
        type=float,
        help="the share of the validation split's positives (melanomas; malignant lesions) each threshold must flag "
        "(default: each rule's own)",
    )
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=USE_TTA_BY_DEFAULT)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        r = choose_operating_point(
            args.checkpoint,
            args.data,
            rules=[rules[key] for key in args.rule] if args.rule else REFERRAL_RULES,
            sensitivity=args.sensitivity,
            tta=args.tta,
            device=args.device,
        )
    except USER_ERRORS as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for c in r["rules"]:
        print(
            f"{r['checkpoint']}: {c['rule']} operating point P({c['rule']}) >= {c['threshold']:.4f}, recorded. On the "
            f"{r['val_images']} validation images ({r['tta_views']}): sensitivity {c['val_sensitivity']:.3f}, "
            f"specificity {c['val_specificity']:.3f} (target sensitivity {c['target_sensitivity']:.2f})."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
