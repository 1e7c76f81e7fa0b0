"""argparse for ``fine-seg``: numbers as users type them.

argparse takes a value that starts with '-' for an option name unless it is a plain negative number
(``-5``, ``-2.5``), so ``--point -100,50,120`` and ``--lr -1e-3`` ended in "expected one argument".
:class:`Parser` hands such a value to its option before argparse sees it, and joins a list of numbers
typed across several words (``--point -100, 50, 120``, ``--target-spacing 3 3 6``). The types check the
numbers' range, so a wrong number ends in one sentence (argparse's exit status 2), not a traceback.
"""
from __future__ import annotations

import argparse
import math
import re
import sys
from typing import Sequence

# A word that starts like a negative number is a value: no option of fine-seg starts with '-' and a digit.
_NEGATIVE = re.compile(r"-\.?\d")
_SEPARATORS = re.compile(r"[\s,;]+")
_COUNTS = {2: "two", 3: "three"}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class Number:
    """argparse type: one number (``int`` or ``float``) within bounds."""

    def __init__(self, kind: type = float, *, at_least: float | None = None, above: float | None = None,
                 at_most: float | None = None) -> None:
        self.kind, self.at_least, self.above, self.at_most = kind, at_least, above, at_most
        noun = "a whole number" if kind is int else "a number"
        if at_least is not None and at_most is not None:
            self.description = f"{noun} from {at_least} to {at_most}"
        elif at_least is not None:
            self.description = f"{noun} of at least {at_least}"
        elif above is not None:
            self.description = f"{noun} above {above}"
        else:
            self.description = noun

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not {'a whole number' if self.kind is int else 'a number'}; "
                                             f"give {self.description}.") from None
        if (not math.isfinite(value) or (self.at_least is not None and value < self.at_least)
                or (self.above is not None and value <= self.above) or (self.at_most is not None and value > self.at_most)):
            raise argparse.ArgumentTypeError(f"{text} is out of range; give {self.description}.")
        return value


class NumberList:
    """argparse type: ``count`` numbers separated by commas and/or spaces, brackets allowed -> a tuple of floats."""

    def __init__(self, count: int, what: str, example: str, positive: bool = False) -> None:
        self.count, self.what, self.example, self.positive = count, what, example, positive

    @staticmethod
    def _parts(text: str) -> list[str]:
        return [p for p in _SEPARATORS.split(text.strip().strip("[]()")) if p]

    def __call__(self, text: str) -> tuple[float, ...]:
        try:
            values = tuple(float(p) for p in self._parts(text))
        except ValueError:
            values = ()
        if len(values) != self.count or not all(math.isfinite(v) and (v > 0 or not self.positive) for v in values):
            numbers = f"{_COUNTS.get(self.count, self.count)} {'positive ' if self.positive else ''}numbers"
            raise argparse.ArgumentTypeError(f"'{text}' is not {self.what}; give {numbers} separated by commas, such as {self.example}.")
        return values

    def continues(self, typed: str, word: str) -> bool:
        """Whether the next word is more of the list typed so far: next to a comma, or a number still missing."""
        if typed.rstrip().endswith(",") or word.lstrip().startswith(","):
            return True
        return len(self._parts(typed)) < self.count and _is_number(word.strip().rstrip(",])"))


class Parser(argparse.ArgumentParser):
    """An ArgumentParser (and, through add_subparsers, its subcommands) that reads numbers as users type them."""

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None):
        words = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args(self._attach_numbers(words), namespace)

    def _number_option(self, word: str) -> tuple[argparse.Action | None, str]:
        """The option that takes numbers which ``word`` names (an abbreviation too, as argparse allows), and its name."""
        if not word.startswith("-"):
            return None, word
        # _option_string_actions: every option name of this parser, argument groups included.
        actions = self._option_string_actions
        names = [word] if word in actions else (
            [n for n in actions if n.startswith(word)] if self.allow_abbrev and word.startswith("--") else [])
        if len(names) != 1:
            return None, word  # unknown or ambiguous: argparse says so
        action = actions[names[0]]
        numeric = action.type in (int, float) or isinstance(action.type, (Number, NumberList))
        return (action, names[0]) if numeric and action.nargs is None else (None, word)

    def _attach_numbers(self, words: list[str]) -> list[str]:
        """Rewrite ``--opt VALUE...`` as ``--opt=VALUE`` for options that take numbers, so a leading '-' stays a value."""
        out, rest = [], list(words)
        while rest:
            word = rest.pop(0)
            if word == "--":  # what follows is positional
                return out + [word] + rest
            name, _, value = word.partition("=")
            action, option = self._number_option(name)
            if action is None:
                out.append(word)
                continue
            if not value:
                if not rest or (rest[0].startswith("-") and not _NEGATIVE.match(rest[0])):
                    out.append(word)  # no value: argparse reports it
                    continue
                value = rest.pop(0)
            if isinstance(action.type, NumberList):
                while rest and action.type.continues(value, rest[0]):
                    value += " " + rest.pop(0)
            out.append(f"{option}={value}")
        return out
