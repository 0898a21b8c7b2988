"""``python -m jaxllm.scaling``: evaluate a scaling law, or fit a power law to a CSV.

    python -m jaxllm.scaling laws
    python -m jaxllm.scaling eval fp_quant_loss n_params=1e9 n_tokens=1e11 \\
        exponent_bits=4,2 mantissa_bits=3,1 block_size=128
    python -m jaxllm.scaling fit runs.csv --x compute --y loss --offset --plot fit.png

``eval`` takes ``key=value`` arguments; a comma list gives one row per element (lists of equal
length go together, single values repeat). ``fit`` reads two columns of a CSV with a header
(the first two unless ``--x``/``--y`` name others).
"""

import argparse
import csv
import dataclasses
import inspect
import sys

import numpy as np

from jaxllm import scaling

LAWS = {
    name: getattr(scaling, name)
    for name in (
        "fp_quant_loss",
        "fp_quant_bf16_loss",
        "critical_data_size",
        "optimal_exmy",
        "optimal_exmy_continuous",
        "optimal_precision",
        "optimal_precision_fixed_data",
        "optimal_precision_fixed_params",
        "surge_optimal_lr",
        "sgd_optimal_lr",
        "kaplan_critical_batch_size",
        "batch_size_fixed_data",
        "batch_size_fixed_compute",
        "lr_for_batch_size",
        "linear_complexity_loss",
        "linear_complexity_optimal_params",
        "linear_complexity_optimal_tokens",
        "linear_complexity_param_count",
        "flops_to_pflops_days",
    )
}
_TUPLE_FIELDS = {
    "optimal_exmy": ("exponent_bits", "mantissa_bits"),
    "optimal_exmy_continuous": ("exponent_bits", "mantissa_bits"),
}


class UsageError(Exception):
    """A bad command line: printed as one line, exit status 2."""


def _parse_value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _parse_points(pairs: list[str]) -> list[dict]:
    columns = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"expected key=value, got {pair!r}")
        columns[key] = [_parse_value(v) for v in value.split(",")]
    lengths = {len(v) for v in columns.values() if len(v) > 1}
    if len(lengths) > 1:
        raise UsageError(f"comma lists must have equal lengths, got {sorted(lengths)}")
    n = lengths.pop() if lengths else 1
    return [{k: v[i] if len(v) > 1 else v[0] for k, v in columns.items()} for i in range(n)]


def _result_fields(name: str, result) -> dict:
    if dataclasses.is_dataclass(result):
        return dataclasses.asdict(result)
    if isinstance(result, tuple):
        names = _TUPLE_FIELDS.get(name, [f"value_{i}" for i in range(len(result))])
        return dict(zip(names, result))
    return {"value": result}


def _format(value) -> str:
    if isinstance(value, (int, np.integer, str)):
        return str(value)
    return f"{float(value):.6g}"


def _print_table(rows: list[dict]) -> None:
    headers = list(rows[0])
    cells = [[_format(row[h]) for h in headers] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths)))


def _cli_params(fn) -> dict[str, inspect.Parameter]:
    """The arguments a command line can give: those without a default or with a plain one."""
    return {
        name: p
        for name, p in inspect.signature(fn).parameters.items()
        if p.default is inspect.Parameter.empty or isinstance(p.default, (int, float, str))
    }


def cmd_laws(args: argparse.Namespace) -> None:
    for name, fn in LAWS.items():
        params = [
            k if p.default is inspect.Parameter.empty else f"{k}={p.default}"
            for k, p in _cli_params(fn).items()
        ]
        print(f"{name} {' '.join(params)}")


def cmd_eval(args: argparse.Namespace) -> None:
    if args.law not in LAWS:
        raise UsageError(f"unknown law {args.law!r}; `laws` lists them: {', '.join(LAWS)}")
    fn = LAWS[args.law]
    rows = []
    accepted = _cli_params(fn)
    for point in _parse_points(args.points):
        unknown = sorted(set(point) - set(accepted))
        missing = [k for k, p in accepted.items() if p.default is p.empty and k not in point]
        if unknown or missing:
            problem = f"unknown {unknown}" if unknown else f"missing {missing}"
            raise UsageError(f"{args.law}: {problem}; it takes {', '.join(accepted)}")
        try:
            result = fn(**point)
        except (ValueError, KeyError) as e:
            raise UsageError(f"{args.law}: {e}") from None
        rows.append({**point, **_result_fields(args.law, result)})
    _print_table(rows)


def _read_columns(path: str, x_name: str | None, y_name: str | None):
    try:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            records = list(reader)
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None
    if len(header) < 2:
        raise UsageError(f"{path}: need a header row with at least two columns")
    x_name = x_name or header[0]
    y_name = y_name or header[1]
    for col in (x_name, y_name):
        if col not in header:
            raise UsageError(f"{path}: no column {col!r}; columns are {', '.join(header)}")
    try:
        x = np.array([float(r[x_name]) for r in records])
        y = np.array([float(r[y_name]) for r in records])
    except (TypeError, ValueError):
        raise UsageError(f"{path}: columns {x_name!r} and {y_name!r} must be numbers") from None
    return x_name, y_name, x, y


def cmd_fit(args: argparse.Namespace) -> None:
    x_name, y_name, x, y = _read_columns(args.csv, args.x, args.y)
    try:
        fit = scaling.fit_power_law(x, y, offset=args.offset)
    except ValueError as e:
        raise UsageError(f"fit: {e}") from None
    print(f"{y_name} vs {x_name}: {fit}")
    if args.plot:
        # matplotlib (about 1 s to import) only with --plot; the backend before pyplot.
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(5, 3.5))
        grid = np.geomspace(x.min(), x.max(), 200)
        ax.loglog(x, y, "o", label="data")
        ax.loglog(grid, fit(grid), "-", label=str(fit).split("  ")[0])
        ax.set_xlabel(x_name)
        ax.set_ylabel(y_name)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        plt.close(fig)
        print(f"plot written to {args.plot}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jaxllm.scaling", description=__doc__.split("\n")[0]
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("laws", help="list the laws eval knows, with their arguments")
    p_eval = sub.add_parser("eval", help="evaluate a law at key=value points")
    p_eval.add_argument("law")
    p_eval.add_argument("points", nargs="*", metavar="key=value")
    p_fit = sub.add_parser("fit", help="fit y = a*x^b (+ c) to two CSV columns")
    p_fit.add_argument("csv")
    p_fit.add_argument("--x", help="abscissa column (default: the first)")
    p_fit.add_argument("--y", help="ordinate column (default: the second)")
    p_fit.add_argument("--offset", action="store_true", help="fit an additive constant too")
    p_fit.add_argument("--plot", metavar="PNG", help="write a log-log plot of data and fit")
    args = parser.parse_args(argv)
    try:
        {"laws": cmd_laws, "eval": cmd_eval, "fit": cmd_fit}[args.command](args)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
