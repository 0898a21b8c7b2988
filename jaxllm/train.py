"""Train a model: `python -m jaxllm.train [PRESET_OR_PATH] [key.sub=value ...]`.

PRESET is a name from configs/ (default `default`) or a path to a YAML file. Exit codes:
0 success (also a clean stop on SIGTERM / Ctrl-C after its checkpoint), 2 user error
(config, data, paths), 1 anything else.
"""

from __future__ import annotations

import sys
import textwrap

from jaxllm import choices, config
from jaxllm.data import DataError
from jaxllm.parallel.core import distributed
from jaxllm.training.loop import train

USAGE = "python -m jaxllm.train [PRESET_OR_PATH] [key.sub=value ...] [--print-config] [--help]"


def _help() -> str:
    lines = [USAGE, "", textwrap.dedent(__doc__.split("\n", 2)[2]).strip(), "", "Presets:"]
    lines.append("  " + ", ".join(config.presets()))
    lines += ["", "Keys (key = default):"]
    for key, typ, desc in config.keys():
        lines.append(f"  {key:<28} {typ}" + (f"  — {desc}" if desc else ""))
    return "\n".join([*lines, "", *choices.known()])


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" in argv or "--help" in argv:
        print(_help())
        return 0
    print_only = "--print-config" in argv
    argv = [a for a in argv if a != "--print-config"]
    try:
        # one of several processes: join them before jax starts (jaxllm.parallel.core.distributed)
        cluster, argv = distributed.pop_flags(argv)
        if not print_only:
            distributed.initialize(cluster)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    unknown = [a for a in argv if a.startswith("--")]
    if unknown:
        print(f"error: unknown option {unknown[0]}; usage: {USAGE}", file=sys.stderr)
        return 2
    preset = "default"
    if argv and "=" not in argv[0]:
        preset, argv = argv[0], argv[1:]

    try:
        cfg = config.load(preset, argv)
        choices.check(cfg)
        if print_only:
            print(config.to_yaml(cfg), end="")
            return 0
        train(cfg)
    except (config.ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
