"""Build the critique-local E2B template (needs E2B_API_KEY and internet access):

    python sandboxes/e2b/build_template.py [--alias critique-local-opencode]

Then set sandbox.backend = "e2b", e2b.template to the alias and e2b.gateway_url.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from e2b import Template, default_build_logger

sys.path.insert(0, str(Path(__file__).resolve().parent))
from template import ALIAS, template  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--alias", default=ALIAS)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--memory-mb", type=int, default=4096)
    args = parser.parse_args()
    info = Template.build(template(), alias=args.alias, cpu_count=args.cpus, memory_mb=args.memory_mb,
                          on_build_logs=default_build_logger())
    print(f"built template {args.alias}: {info}")


if __name__ == "__main__":
    main()
