"""What a claim is, and what measuring it returns.

An experiment module in `llmkit.lab.experiments` defines `CLAIM = Claim(...)` whose `run(ctx)` performs
the experiment once per seed in `ctx.seeds` and returns a `Result`. Everything a row of docs/claims.md
shows comes from these two objects: the guide's wording and figure from the `Claim`, the measured values
(one per seed, so a spread), the verdict and the setup from the `Result`.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

Verdict = Literal["holds", "partly holds", "does not hold", "modelled", "not measured"]
""""modelled": the figure comes from a model of assumed inputs (e.g. cloud prices), not a measurement, so it
can neither hold nor fail; "not measured": the experiment could not run here (no GPU) or failed."""

VERDICTS = ("holds", "partly holds", "does not hold", "modelled", "not measured")


@dataclass
class ExperimentContext:
    seeds: list[int]
    """At least 3 for a real run; `quick` runs may use fewer."""
    quick: bool
    """A seconds-long smoke version (tests); numbers from it are not evidence."""
    out_dir: Path
    """Where the experiment writes plots (PNG) and any raw data; created by the runner."""


@dataclass
class Measurement:
    name: str
    """What was measured, e.g. "Linear weight bytes saved"."""
    values: list[float]
    """One value per seed (or per repeat)."""
    unit: str = ""
    """"%", "x", "s", "" ..."""
    claimed: str | None = None
    """The guide's figure for this quantity, as the guide puts it (e.g. "-75%")."""

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def std(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def text(self, digits: int = 3) -> str:
        """"0.746 ± 0.001 (n=3)" style, with the unit."""
        unit = f" {self.unit}" if self.unit and self.unit not in ("%", "x") else self.unit
        return f"{self.mean:.{digits}g}{unit} ± {self.std:.2g} (n={len(self.values)})"


@dataclass
class Result:
    measurements: list[Measurement]
    verdict: Verdict
    summary: str
    """One sentence: the measured figure against the guide's and why the verdict."""
    setup: str
    """Model sizes, data, steps, what was compared: enough to judge the number."""
    plots: list[str] = field(default_factory=list)
    """PNG paths (relative to ctx.out_dir) that illustrate the result."""
    seconds: float = 0.0
    """Filled in by the runner."""
    details: str = ""
    """Optional Markdown (e.g. a sensitivity table) shown under the claim's section of docs/claims.md."""


@dataclass
class Claim:
    id: str
    """Short name used on the command line: `llmkit lab run int8`."""
    section: str
    """The guide's section, e.g. "§2.2"."""
    guide_zh: str
    """The guide's sentence, verbatim (Chinese)."""
    guide_en: str
    """Its English translation."""
    claimed: str
    """The guide's figure in a few words, e.g. "-75% size, 2-3x speed"."""
    run: Callable[[ExperimentContext], Result]
    minutes: float = 5.0
    """Expected minutes of a full run on 2 idle CPU cores (tests/test_lab.py holds every claim to <= 20: distill,
    the longest, trains a teacher and three students)."""
