"""Reading a YAML file a user wrote: one-line errors that name the file and the line."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from spark_quant.errors import UserError


def read_yaml(path: Path, what: str, hint: str) -> Any:
    """Parse ``path``; a missing file, a syntax error or non-UTF-8 text becomes a UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: {what} not found; {hint}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', e)}); fix the {what} syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save the {what} as UTF-8") from None
