"""Recipe files: `--config FILE` (YAML) fills the flags the command line leaves out.

Keys are the flags' names (`batch_size`, `norm_pix_loss`, or an option such as `cls_token`); a
file's values take the place of the parser's defaults and every flag given on the command line
wins, as with timm's `train.py -c`. Values are checked as argparse would check them on the command
line (type, choices), so a file cannot carry what the command line would refuse; YAML's own
number rules (`5e-4` is a string to YAML 1.1) do not leak into the run.

The parser itself is never changed (launchers compare values with its defaults), and the resolved
config of a run is written back in the same format (`dump`), so `--config <output_dir>/config.yaml`
reruns it.
"""
import argparse
import difflib
import os
from typing import Dict, Iterable, List, Optional, Set, Tuple

import yaml

from .errors import UserError

_UNSET = object()

# The argparse internals read here (`_actions`, `option_strings`, `dest`, `nargs`, `const`, `type`,
# `choices`, `default`) have been stable since Python 2.7; argparse has no public way to list them.


def _actions(parser: argparse.ArgumentParser) -> List[argparse.Action]:
    return [a for a in parser._actions if a.dest != argparse.SUPPRESS and not isinstance(a, argparse._HelpAction)]


def _keys(parser: argparse.ArgumentParser) -> Dict[str, Tuple[str, List[argparse.Action], Optional[argparse.Action]]]:
    """key -> (dest, the dest's actions, the action of that option when the key names an option)."""
    by_dest: Dict[str, List[argparse.Action]] = {}
    for a in _actions(parser):
        by_dest.setdefault(a.dest, []).append(a)
    keys = {dest: (dest, acts, None) for dest, acts in by_dest.items()}
    for dest, acts in by_dest.items():
        for a in acts:
            for opt in a.option_strings:
                name = opt.lstrip("-")
                if name not in keys:  # a dest of the same name is the stronger meaning
                    keys[name] = (dest, acts, a)
    return keys


def given_on_command_line(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> Set[str]:
    """The dests the command line sets. argparse fills in a default only where the namespace has
    no value yet, so a namespace pre-filled with a sentinel keeps it exactly where no flag came."""
    ns = argparse.Namespace(**{a.dest: _UNSET for a in _actions(parser)})
    parsed = parser.parse_args(argv, namespace=ns)
    return {k for k, v in vars(parsed).items() if v is not _UNSET}


_TYPE_WORDS = {int: "an integer", float: "a number", str: "a string"}


def _convert(value, typ, key: str, where: str, flag: str):
    what = _TYPE_WORDS.get(typ, f"a value {flag} accepts")
    if isinstance(value, bool) or isinstance(value, (list, dict)) or value is None:
        ok = False
    elif typ is str:
        ok, value = isinstance(value, (str, int, float)), str(value)
    elif typ is int:
        ok = isinstance(value, int) or (isinstance(value, str) and value.strip().lstrip("+-").isdigit())
        value = int(value) if ok else value
    elif typ is float and isinstance(value, (int, float)):
        ok, value = True, float(value)
    else:  # float or a flag's own type function get the text, as on the command line
        try:
            value, ok = typ(str(value)), True
        except (ValueError, TypeError, argparse.ArgumentTypeError):
            ok = False
    if not ok:
        raise UserError(f"{where}: '{key}' must be {what} (as {flag} on the command line), got {value!r}")
    return value


def _value(key: str, value, acts: List[argparse.Action], named: Optional[argparse.Action], where: str):
    """The dest's value for a file's `key: value`, checked like the command line; _UNSET: no change."""
    switches = [a for a in acts if a.nargs == 0]
    if named is not None and named.nargs == 0:
        # `cls_token: true` is the flag given; false is the flag left out.
        if not isinstance(value, bool):
            raise UserError(f"{where}: '{key}' must be true or false (true gives {named.option_strings[0]}), "
                            f"got {value!r}")
        return named.const if value else _UNSET
    if switches and len(switches) == len(acts):
        allowed_none = any(a.default is None for a in acts)
        if not isinstance(value, bool) and not (value is None and allowed_none):
            raise UserError(f"{where}: '{key}' must be true or false, got {value!r}")
        return value
    action = named or next(a for a in acts if a.nargs != 0)
    flag = action.option_strings[0] if action.option_strings else key
    typ = action.type or str
    if value is None:
        if action.default is None:
            return None
        raise UserError(f"{where}: '{key}' has no value: give one ({flag} on the command line), or leave the key out")
    if action.nargs in ("+", "*") or isinstance(action.nargs, int):
        items = value if isinstance(value, list) else [value]
        out = [_convert(v, typ, key, where, flag) for v in items]
        if isinstance(action.nargs, int) and len(out) != action.nargs:
            raise UserError(f"{where}: '{key}' takes {action.nargs} values, got {len(out)}")
        if action.nargs == "+" and not out:
            raise UserError(f"{where}: '{key}' takes at least one value")
    else:
        out = _convert(value, typ, key, where, flag)
    for v in out if isinstance(out, list) else [out]:
        if action.choices is not None and v not in action.choices:
            raise UserError(f"{where}: '{key}' is {v!r}; choose one of {', '.join(map(str, action.choices))}")
    return out


def read(path: str, parser: argparse.ArgumentParser) -> Dict[str, object]:
    """The file's values by dest, each checked as the command line would check it."""
    where = f"--config {path}"
    if not os.path.isfile(path):
        raise UserError(f"{where}: no such file" if not os.path.exists(path) else f"{where}: not a file")
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where} is not valid YAML ({at}{problem})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{where} cannot be read: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where} must be a mapping of flag names to values (`batch_size: 64`), "
                        f"not a {type(data).__name__}")
    keys = _keys(parser)
    out: Dict[str, object] = {}
    for key, value in data.items():
        key = str(key)
        if key == "config":
            raise UserError(f"{where}: a recipe file cannot name another one ('config: {value}'); "
                            "merge the two files")
        if key not in keys:
            close = difflib.get_close_matches(key.replace("-", "_"), keys, n=3, cutoff=0.6)
            hint = f"closest: {', '.join(close)}" if close else "see --help for the flags"
            raise UserError(f"{where}: unknown key '{key}', not a flag of this command ({hint})")
        dest, acts, named = keys[key]
        v = _value(key, value, acts, named, where)
        if v is not _UNSET:
            out[dest] = v
    return out


def parse_args(parser: argparse.ArgumentParser, argv: Optional[List[str]] = None) -> argparse.Namespace:
    """parser.parse_args(argv), with the values of `--config FILE` where the command line gives none.

    --effective_batch and --accum_iter say the same thing: one given on the command line drops
    the other's value from the file (the command line wins); both on the command line is an error."""
    args = parser.parse_args(argv)
    given = given_on_command_line(parser, argv)
    if {"effective_batch", "accum_iter"} <= given and args.effective_batch is not None:
        raise UserError("--effective_batch and --accum_iter both given: --effective_batch sets --accum_iter from "
                        "--batch_size and the number of processes; give one of them")
    path = getattr(args, "config", None)
    if not path:
        return args
    values = read(path, parser)
    if "accum_iter" in given:
        values.pop("effective_batch", None)
    for dest, value in values.items():
        if dest not in given:
            setattr(args, dest, value)
    return args


def dump(flags: Dict[str, object], header: Iterable[str] = ()) -> str:
    """YAML text of resolved flags, readable back by read() (the run's <output_dir>/config.yaml)."""
    lines = [f"# {h}" for h in header]
    body = yaml.safe_dump({k: list(v) if isinstance(v, tuple) else v for k, v in flags.items()},
                          sort_keys=False, default_flow_style=False, allow_unicode=True, width=1000)
    return "\n".join(lines + [body])
