"""How accurate is ``progress.eta``? (issue 18)

Replays synthetic progress reports through :class:`jobcast.worker.eta.Estimator` on a virtual
clock, and through two reference estimators in the same run, and prints the mean absolute error of
the predicted finish time at the first report at or past 25, 50 and 75% done, in percent of the
job's true duration (so that short and long jobs weigh the same).

Profiles (each job draws its own figures from a seeded generator, so a run is repeatable):

- ``steady``: a setup step before the first report (5-20% of the job), then equal work per report
  with +-30% noise per step.
- ``accelerating``: the same setup, then a rate that grows through the job (progress ~ t^2: a
  cache warming up, a shrinking search space).
- ``stalling``: steady, with one to three pauses (each 5-15% of the job) at random points: a
  lock, a rate-limited API, a slow shard.

Report granularity varies per job: every 1%, 2%, 5% or 10%.

References: ``overall`` is elapsed time since the attempt started / percent done (what a progress
bar without smoothing shows); ``last step`` extrapolates the pace of the latest report alone.

    .venv/bin/python bench/eta_accuracy.py [--jobs 400] [--seed 1]
"""

from __future__ import annotations

import argparse
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from jobcast.worker.eta import Estimator

MARKS = (25.0, 50.0, 75.0)
GRANULARITIES = (1.0, 2.0, 5.0, 10.0)

#: (time, percent) reports of one job, starting at time 0 (the attempt's start), ending at 100%.
Reports = list[tuple[float, float]]


def _steps(rng: random.Random, step: float) -> Iterator[float]:
    percent = 0.0
    while percent < 100.0:
        percent = min(100.0, percent + step)
        yield percent


def steady(rng: random.Random, step: float) -> Reports:
    at = rng.uniform(5.0, 20.0)  # setup, for a job of about 100 s of work
    reports = []
    for percent in _steps(rng, step):
        at += step * rng.uniform(0.7, 1.3)
        reports.append((at, percent))
    return reports


def accelerating(rng: random.Random, step: float) -> Reports:
    at = rng.uniform(5.0, 20.0)
    speedup = rng.uniform(3.0, 8.0)  # the last step is this many times faster than the first
    reports = []
    for percent in _steps(rng, step):
        pace = 1.0 / (1.0 + (speedup - 1.0) * percent / 100.0)
        at += step * pace * rng.uniform(0.9, 1.1)
        reports.append((at, percent))
    return reports


def stalling(rng: random.Random, step: float) -> Reports:
    at = rng.uniform(5.0, 20.0)
    pauses = {round(rng.uniform(5, 95) / step) * step: rng.uniform(5.0, 15.0) for _ in range(rng.randint(1, 3))}
    reports = []
    for percent in _steps(rng, step):
        at += step * rng.uniform(0.8, 1.2) + pauses.get(percent, 0.0)
        reports.append((at, percent))
    return reports


PROFILES: dict[str, Callable[[random.Random, float], Reports]] = {
    "steady": steady,
    "accelerating": accelerating,
    "stalling": stalling,
}


class _Jobcast:
    name = "jobcast (smoothed pace)"

    def __init__(self) -> None:
        self.estimator = Estimator()

    def observe(self, at: float, percent: float) -> float | None:
        self.estimator.observe(percent, at)
        return self.estimator.remaining_s()


class _Overall:
    name = "overall average"

    def observe(self, at: float, percent: float) -> float | None:
        return at * (100.0 - percent) / percent if percent > 0 else None


class _LastStep:
    name = "last step"

    def __init__(self) -> None:
        self.previous: tuple[float, float] | None = None

    def observe(self, at: float, percent: float) -> float | None:
        previous, self.previous = self.previous, (at, percent)
        if previous is None or percent <= previous[1]:
            return None
        return (at - previous[0]) / (percent - previous[1]) * (100.0 - percent)


ESTIMATORS = (_Jobcast, _Overall, _LastStep)


@dataclass
class Errors:
    """Absolute errors (in % of the job's duration) at each mark, and how often there was none."""

    at: dict[float, list[float]]
    missing: dict[float, int]

    def mean(self, mark: float) -> float:
        values = self.at[mark]
        return sum(values) / len(values) if values else float("nan")


def measure(make: Callable[[], object], reports_of: list[Reports]) -> Errors:
    errors = Errors({m: [] for m in MARKS}, dict.fromkeys(MARKS, 0))
    for reports in reports_of:
        estimator = make()
        finish = reports[-1][0]
        marks = list(MARKS)
        for at, percent in reports:
            remaining = estimator.observe(at, percent)  # type: ignore[attr-defined]
            while marks and percent >= marks[0]:
                mark = marks.pop(0)
                if remaining is None:
                    errors.missing[mark] += 1
                else:
                    errors.at[mark].append(abs(at + remaining - finish) / finish * 100.0)
    return errors


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400, help="jobs per profile")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print("| profile | estimator | MAE at 25% | at 50% | at 75% | no estimate at 25% | ratio to overall (mean of 3) |")
    print("|---|---|---|---|---|---|---|")
    for name, profile in PROFILES.items():
        rng = random.Random(f"{args.seed}-{name}")
        jobs = [profile(rng, rng.choice(GRANULARITIES)) for _ in range(args.jobs)]
        results = {e.name: measure(e, jobs) for e in ESTIMATORS}
        reference = sum(results[_Overall.name].mean(m) for m in MARKS) / len(MARKS)
        for estimator, errors in results.items():
            means = [errors.mean(m) for m in MARKS]
            ratio = sum(means) / len(means) / reference
            cells = " | ".join(f"{value:.1f}%" for value in means)
            missing = errors.missing[25.0] / args.jobs * 100.0
            print(f"| {name} | {estimator} | {cells} | {missing:.0f}% | {ratio:.2f} |")


if __name__ == "__main__":
    main()
